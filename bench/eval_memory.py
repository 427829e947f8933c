"""Peak resident memory of `onecomp eval CHECKPOINT --ref MODEL` (the evaluation alone, in its own
process), next to the reference's size and the issue's bound (1.3 x the larger model + 500 MB).

    OMP_NUM_THREADS=2 python bench/eval_memory.py CHECKPOINT [--ref smollm2-135m] [--tokens 16384]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from common import EVAL


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--ref", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=16384)
    a = ap.parse_args()
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "onecomp_core.cli", "eval", a.checkpoint, "--ref", a.ref,
                           "--text", str(EVAL), "--max-tokens", str(a.tokens), "--json"],
                          capture_output=True, text=True, env={**os.environ, "ONECOMP_PROGRESS": "0"})
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if proc.returncode != 0:
        print(json.dumps({"error": proc.stderr.strip().splitlines()[-1:]}))
        return 1
    from onecomp_core.model_source import resolve_model
    ref_folder = resolve_model(a.ref)
    ref_mb = sum(p.stat().st_size for p in ref_folder.glob("*.safetensors")) / 2**20
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps({"bench": "eval_memory", "checkpoint": a.checkpoint, "ref": a.ref, "tokens": r["tokens"],
                      "ppl": r["ppl"], "kl": r.get("kl"), "seconds": round(time.time() - t0, 1),
                      "peak_rss_mb": round(peak, 1), "ref_mb": round(ref_mb, 1),
                      "bound_mb": round(1.3 * ref_mb + 500, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
