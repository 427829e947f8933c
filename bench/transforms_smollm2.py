"""Equivalent transforms before quantization on SmolLM2-135M (standard protocol: calibration
32 x 512 tokens of enwiki_calib.txt, ppl/KL on the first 16,384 tokens of enwiki_eval.txt): for
each setting, the same run without a transform and with each installed preprocessor, one JSON
line per run, then one JSON object with every row and the checks of docs/benchmarks.md
(`hadamard` beats none at 3b/per-channel and 4b/per-channel under GPTQ+QEP, ...).

    OMP_NUM_THREADS=2 python bench/transforms_smollm2.py [--transforms none,hadamard] [--settings ...] [--quick]
"""
from __future__ import annotations

import argparse
import json

from common import quantize_and_measure

SETTINGS = {
    "3b-channel-gptq": ["--bits", "3", "--group-size", "-1", "--projector", "gptq"],
    "3b-channel-gptq+qep": ["--bits", "3", "--group-size", "-1", "--projector", "gptq", "--correction", "qep"],
    "3b-g128-gptq": ["--bits", "3", "--group-size", "128", "--projector", "gptq"],
    "3b-g128-gptq+qep": ["--bits", "3", "--group-size", "128", "--projector", "gptq", "--correction", "qep"],
    "4b-channel-gptq+qep": ["--bits", "4", "--group-size", "-1", "--projector", "gptq", "--correction", "qep"],
}
CHECKS = [("hadamard", "none", "3b-channel-gptq+qep"), ("hadamard", "none", "4b-channel-gptq+qep"),
          ("spinquant", "hadamard", "3b-channel-gptq+qep"), ("awq", "none", "4b-channel-gptq+qep")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--transforms", default="none,hadamard", help="comma list: none and preprocessor names")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--option", action="append", default=[], help="extra --option for every run")
    ap.add_argument("--quick", action="store_true", help="4,096 eval tokens instead of 16,384")
    a = ap.parse_args()
    tokens = 4096 if a.quick else 16384
    extra = [f for o in a.option for f in ("--option", o)]
    rows = {}
    for setting in a.settings.split(","):
        for t in a.transforms.split(","):
            flags = [*SETTINGS[setting], *([] if t == "none" else ["--preprocessor", t]), *extra]
            r = quantize_and_measure("smollm2-135m", flags, tokens)
            r.update({"setting": setting, "transform": t})
            rows[(setting, t)] = r
            print(json.dumps(r), flush=True)
    checks = {}
    for better, than, setting in CHECKS:
        a_, b_ = rows.get((setting, better)), rows.get((setting, than))
        if a_ and b_ and "ppl" in a_ and "ppl" in b_:
            checks[f"{better}<{than}@{setting}"] = a_["ppl"] < b_["ppl"] and a_["kl"] < b_["kl"]
    print(json.dumps({"bench": "transforms_smollm2", "eval_tokens": tokens, "results": list(rows.values()),
                      "checks": checks}))


if __name__ == "__main__":
    main()
