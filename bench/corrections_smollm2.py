"""Layer-wise methods on SmolLM2-135M: RTN, GPTQ, GPTQ+QEP, GPTQ+LPCD, JointQ, JointQ+QEP at
4b/g128, 4b/per-channel, 3b/g128 and 3b/per-channel on the default (asymmetric) grid.
Perplexity on enwiki_eval, mean KL to the FP model, wall time, peak RSS. Prints one JSON line
per run and then one JSON object. `--quick`: 4,096 eval tokens instead of 16,384 (calibration
stays 32 x 512: with 8 samples GPTQ's Hessians overfit on this model)."""
from __future__ import annotations

import argparse
import json

from common import quantize_and_measure

SETTINGS = [("4", "128"), ("4", "channel"), ("3", "128"), ("3", "channel")]
METHODS = {
    "rtn": ["--projector", "rtn"],
    "gptq": ["--projector", "gptq"],
    "gptq+qep": ["--projector", "gptq", "--correction", "qep"],
    "gptq+lpcd": ["--projector", "gptq", "--correction", "lpcd"],
    "jointq": ["--projector", "jointq"],
    "jointq+qep": ["--projector", "jointq", "--correction", "qep"],
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--settings", default=",".join(f"{b}/{g}" for b, g in SETTINGS))
    ap.add_argument("--option", action="append", default=[], help="extra --option for every run, e.g. lpcd.alpha=0.5")
    ap.add_argument("--forward-dtypes", default="auto", help="comma list of --forward-dtype values, each run with "
                    "every setting and method (e.g. off,auto: float32 forwards against the default)")
    a = ap.parse_args()
    extra = [f for o in a.option for f in ("--option", o)]          # the default (asymmetric) grid
    tokens = 4096 if a.quick else 16384
    rows = []
    for setting in a.settings.split(","):
        bits, group = setting.split("/")
        for m in a.methods.split(","):
            for fd in a.forward_dtypes.split(","):
                r = quantize_and_measure("smollm2-135m", ["--bits", bits, "--group-size", group, *METHODS[m], *extra,
                                                          "--forward-dtype", fd], tokens)
                r.update({"setting": f"{bits}b/{'g' + group if group != 'channel' else 'channel'}", "method": m,
                          "options": a.option, "forward_dtype": fd})
                rows.append(r)
                print(json.dumps(r), flush=True)
    print(json.dumps({"bench": "corrections_smollm2", "eval_tokens": tokens, "calibration_samples": 32,
                      "results": rows}))


if __name__ == "__main__":
    main()
