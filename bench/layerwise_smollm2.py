"""RTN vs GPTQ on SmolLM2-135M (the packaged default model): calibration 32 x 512 tokens of
enwiki_calib.txt, perplexity and KL on the first 16,384 tokens of enwiki_eval.txt in 512-token
windows. Prints one JSON object. `--quick`: 4,096 eval tokens."""
from __future__ import annotations

import argparse
import json
import platform

import torch

from common import quantize_and_measure

SETTINGS = [("4", "128"), ("3", "128")]
PROJECTORS = ["rtn", "gptq"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--grids", default="sym,asym", help="comma list of sym, asym")
    a = ap.parse_args()
    extra: list[str] = []
    tokens = 4096 if a.quick else 16384
    rows = []
    for bits, group in SETTINGS:
        for grid in a.grids.split(","):
            for proj in PROJECTORS:
                flags = ["--bits", bits, "--group-size", group, f"--{grid}", "--projector", proj, *extra]
                r = quantize_and_measure("smollm2-135m", flags, tokens)
                r.update({"bits": int(bits), "group": int(group), "grid": grid, "projector": proj})
                rows.append(r)
                print(json.dumps(r), flush=True)
    print(json.dumps({"bench": "layerwise_smollm2", "machine": platform.processor() or platform.machine(),
                      "threads": torch.get_num_threads(), "eval_tokens": tokens, "results": rows}))


if __name__ == "__main__":
    main()
