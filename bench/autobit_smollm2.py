"""AutoBit + GPTQ on SmolLM2-135M at 3.0 and 2.5 average bpw, against uniform GPTQ at the
nearest uniform settings of no more bits and against the naive (Frobenius) error model.
Same protocol as layerwise_smollm2.py, on the default (asymmetric) grid unless --sym.
"conditional" is the GPTQ-aware model (GPTQ's conditional input variances and the output
curvature diagonal from the true Fisher: the default with GPTQ), "activation" the diagonal one
(input Gram diagonal and output curvature); "-empirical-fisher": the curvature from the data's
next tokens instead of tokens drawn from the model; "-no-curvature" drops the curvature.
The nearest uniform settings of no more bits:
asymmetric 2b g32 (2.5625 bpw) at 3.0 and 2b g64 (2.28) at 2.5; symmetric 2b g32 (2.5) at both.
Prints one JSON line per run and one JSON object."""
from __future__ import annotations

import argparse
import json

from common import quantize_and_measure

def _ab(budget, *options):
    """An AutoBit run at ``budget`` bpw with the given autobit options (key=value, JSON values)."""
    flags = ["--planner", "autobit", "--target-bpw", budget]
    for o in options:
        flags += ["--option", f"autobit.{o}"]
    return flags


COND, ACT, FROB, EMP = 'error="conditional"', 'error="activation"', 'error="frobenius"', 'fisher="empirical"'
RUNS = [
    # budget 3.0 bpw
    ("autobit-conditional@3.0", _ab("3.0", COND)),
    ("autobit-conditional-empirical-fisher@3.0", _ab("3.0", COND, EMP)),
    ("autobit-activation-empirical-fisher@3.0", _ab("3.0", ACT, EMP)),
    ("autobit-activation-no-curvature@3.0", _ab("3.0", ACT, "curvature=false")),
    ("autobit-frobenius@3.0", _ab("3.0", FROB)),
    ("uniform 3b channel", ["--bits", "3", "--group-size", "channel"]),   # 3.02-3.03 bpw: over 3.0
    ("uniform 2b g32", ["--bits", "2", "--group-size", "32"]),            # nearest uniform <= 3.0 (and <= 2.5 symmetric)
    ("uniform 2b g64", ["--bits", "2", "--group-size", "64"]),            # nearest uniform <= 2.5 asymmetric
    # budget 2.5 bpw
    ("autobit-conditional@2.5", _ab("2.5", COND)),
    ("autobit-conditional-empirical-fisher@2.5", _ab("2.5", COND, EMP)),
    ("autobit-conditional-empirical-fisher-32-samples@2.5", _ab("2.5", COND, EMP, "curvature_samples=32")),
    ("autobit-conditional-no-curvature@2.5", _ab("2.5", COND, "curvature=false")),
    ("autobit-activation-empirical-fisher@2.5", _ab("2.5", ACT, EMP)),
    ("autobit-frobenius@2.5", _ab("2.5", FROB)),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="", help="comma list of run labels to keep")
    ap.add_argument("--sym", action="store_true", help="symmetric grid (the first published table)")
    a = ap.parse_args()
    extra = ["--projector", "gptq", *(["--sym"] if a.sym else [])]
    tokens = 4096 if a.quick else 16384
    rows = []
    for label, flags in RUNS:
        if a.only and label not in a.only.split(","):
            continue
        r = quantize_and_measure("smollm2-135m", [*flags, *extra], tokens)
        r["run"] = label
        rows.append(r)
        print(json.dumps(r), flush=True)
    print(json.dumps({"bench": "autobit_smollm2", "eval_tokens": tokens, "symmetric": a.sym, "results": rows}))


if __name__ == "__main__":
    main()
