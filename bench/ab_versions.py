"""The same quantization with two onecomp installations, back to back on one machine: e.g. the
release before a change (a second checkout with its own .venv) against this one. Runs are
interleaved (A, B, A, B, ...) so that load drifts hit both alike. Prints one JSON line per run,
then one JSON object with, per side, the perplexity (which must not differ) and the medians of
the layer-wise seconds and the peak RSS, and B's change against A in percent.

    python bench/ab_versions.py --a /path/to/old/.venv/bin/python --b .venv/bin/python \\
        --flags "--bits 4 --group-size 128 --projector gptq" --repeat 2
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys

from common import quantize_and_measure


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", required=True, help="python of installation A (the baseline)")
    ap.add_argument("--b", default=sys.executable, help="python of installation B (default: this one)")
    ap.add_argument("--flags", default="--bits 4 --group-size 128 --projector gptq")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    a = ap.parse_args()
    flags = shlex.split(a.flags)
    runs = {"A": [], "B": []}
    for i in range(a.repeat):
        for side, py in (("A", a.a), ("B", a.b)):
            r = quantize_and_measure(a.model, flags, a.eval_tokens, python=py)
            r.update({"side": side, "python": py, "repeat": i})
            runs[side].append(r)
            print(json.dumps(r), flush=True)
    out = {"bench": "ab_versions", "flags": a.flags, "model": a.model, "repeat": a.repeat}
    for side, rs in runs.items():
        ok = [r for r in rs if "ppl" in r]
        out[side] = {"ppl": sorted({r["ppl"] for r in ok}), "kl": sorted({r["kl"] for r in ok}),
                     "layerwise_s": statistics.median(r["layerwise_s"] for r in ok) if ok else None,
                     "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in ok) if ok else None,
                     "errors": [r["error"] for r in rs if "error" in r]}
    if out["A"]["layerwise_s"] and out["B"]["layerwise_s"]:
        out["B_vs_A_pct"] = {k: round(100 * (out["B"][k] / out["A"][k] - 1), 1) for k in ("layerwise_s", "peak_rss_mb")}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
