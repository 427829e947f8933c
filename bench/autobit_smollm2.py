"""AutoBit + GPTQ on SmolLM2-135M at 3.0 and 2.5 average bpw, against uniform GPTQ at the
nearest uniform settings of no more bits and against the naive (Frobenius) error model.
Same protocol as layerwise_smollm2.py. "activation" is the default error model (input Gram
diagonal and output curvature diagonal); "-no-curvature" drops the curvature. Prints one JSON
line per run and one JSON object."""
from __future__ import annotations

import argparse
import json

from common import quantize_and_measure

RUNS = [
    # budget 3.0 bpw
    ("autobit-activation@3.0", ["--planner", "autobit", "--target-bpw", "3.0"]),        # A and B (default)
    ("autobit-activation-no-curvature@3.0", ["--planner", "autobit", "--target-bpw", "3.0",
                                             "--option", "autobit.curvature=false"]),
    ("autobit-frobenius@3.0", ["--planner", "autobit", "--target-bpw", "3.0", "--option", "autobit.error=\"frobenius\""]),
    ("uniform 3b channel (3.03 bpw)", ["--bits", "3", "--group-size", "channel"]),
    ("uniform 2b g32 (2.5 bpw)", ["--bits", "2", "--group-size", "32"]),   # nearest uniform <= 3.0 and <= 2.5
    # budget 2.5 bpw
    ("autobit-activation@2.5", ["--planner", "autobit", "--target-bpw", "2.5"]),
    ("autobit-frobenius@2.5", ["--planner", "autobit", "--target-bpw", "2.5", "--option", "autobit.error=\"frobenius\""]),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="", help="comma list of run labels to keep")
    a = ap.parse_args()
    extra = ["--projector", "gptq", "--sym"]
    tokens = 4096 if a.quick else 16384
    rows = []
    for label, flags in RUNS:
        if a.only and label not in a.only.split(","):
            continue
        r = quantize_and_measure("smollm2-135m", [*flags, *extra], tokens)
        r["run"] = label
        rows.append(r)
        print(json.dumps(r), flush=True)
    print(json.dumps({"bench": "autobit_smollm2", "eval_tokens": tokens, "results": rows}))


if __name__ == "__main__":
    main()
