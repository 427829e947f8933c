"""1-2 bit formats on SmolLM2-135M, layer-wise only: DBF and MDBF at 1.0, 1.5 and 2.0 bpw
against uniform 2-bit GPTQ at every group size (all of which store more than 2.0 bpw;
asymmetric grid unless --sym), and
AutoBit mixing DBF and GPTQ modules at 2.0 bpw. `--correction qep` puts QEP in front;
`--calibration FILE` calibrates on another text, e.g. a replicate on the second half of the
corpus: `tail -n +6256 data/enwiki_calib.txt > calib_b.txt` (from the article 'Andorra' on), or on
its last quarter: `tail -n +9701 data/enwiki_calib.txt > calib_c.txt` (from 'Abacus' on).
Same protocol as layerwise_smollm2.py (32 x 512 calibration tokens, enwiki_eval). `--model`
runs the same protocol on another local model (e.g. a wider one, where MDBF's second envelope
rank costs a smaller share of the sign columns). Prints one JSON line per run, then one JSON
object with all of them and `checks`: issue 5's two criteria judged on these runs (null where a
run they need was skipped or failed)."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from common import CALIB, quantize_and_measure


def own_options(fmt: str, options: list[str]) -> list[str]:
    """The --option values meant for ``fmt``'s projector (those named ``fmt.key=value``)."""
    return [o for o in options if o.startswith(f"{fmt}.")]


def runs(iters: int, sym: bool, options: list[str]):
    out = []
    for bpw in ("1.0", "1.5", "2.0"):
        for fmt in ("dbf", "mdbf"):
            mine = own_options(fmt, options)
            out.append((f"{fmt}@{bpw}", ["--format", fmt, "--projector", fmt, "--target-bpw", bpw,
                                         "--option", f"{fmt}.iters={iters}",
                                         *[x for o in mine for x in ("--option", o)]]))
    for group in ("128", "64", "32", "channel"):
        out.append((f"gptq 2b {group}", ["--projector", "gptq", "--bits", "2", "--group-size", group,
                                            *(["--sym"] if sym else [])]))
    # mixed: AutoBit may give modules DBF factors at 1.0/1.5 bpw or a 2-4 bit GPTQ grid
    out.append(("autobit+dbf@2.0", ["--planner", "autobit", "--target-bpw", "2.0", "--projector", "gptq",
                                    "--option", "autobit.binary=[1.0,1.5]", "--option", "autobit.bits=[2,3,4]",
                                    "--option", f"dbf.iters={iters}"]))
    return out


def checks(rows: list[dict]) -> dict:
    """Issue 5's criteria on the measured rows: MDBF below DBF in perplexity at each budget, and
    at 2.0 bpw DBF or MDBF below the best 2-bit GPTQ row while storing no more bits per weight."""
    measured = {r["label"]: r for r in rows if "ppl" in r}       # failed runs carry no ppl
    out = {}
    for bpw in ("1.0", "1.5", "2.0"):
        d, m = measured.get(f"dbf@{bpw}"), measured.get(f"mdbf@{bpw}")
        out[f"mdbf_below_dbf@{bpw}"] = None if d is None or m is None else m["ppl"] < d["ppl"]
    gptq = [r for label, r in measured.items() if label.startswith("gptq 2b")]
    binary = [measured[x] for x in ("dbf@2.0", "mdbf@2.0") if x in measured]
    if gptq and binary:
        best = min(gptq, key=lambda r: r["ppl"])
        out["binary_beats_best_gptq_2b@2.0"] = any(b["ppl"] < best["ppl"] and b["bpw"] <= best["bpw"] for b in binary)
        out["best_gptq_2b"] = {"run": best["label"], "ppl": best["ppl"], "bpw": best["bpw"]}
    else:
        out["binary_beats_best_gptq_2b@2.0"] = None
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m", help="the model to quantize (a local folder; default: SmolLM2-135M)")
    ap.add_argument("--iters", type=int, default=40, help="ADMM iterations of dbf/mdbf")
    ap.add_argument("--only", default="", help="comma list of run labels to keep")
    ap.add_argument("--sym", action="store_true", help="uniform GPTQ rows on the symmetric grid (the first table)")
    ap.add_argument("--correction", default="", help="a layer-wise correction in front of every projector, e.g. qep")
    ap.add_argument("--option", action="append", default=[],
                    help="extra projector option for the dbf/mdbf runs, e.g. mdbf.envelope=best (repeatable)")
    ap.add_argument("--calibration", default="",
                    help="another calibration text (e.g. a later part of the same corpus): a replicate")
    ap.add_argument("--samples", type=int, default=0,
                    help="calibration sequences of 512 tokens (default: the protocol's 32)")
    ap.add_argument("--reports", default="", help="a folder to keep each run's report.json in (per-module errors)")
    a = ap.parse_args()
    extra = (["--correction", a.correction] if a.correction else []) + (["--num-samples", str(a.samples)] if a.samples else [])
    rows = []
    for label, flags in runs(a.iters, a.sym, a.option):
        if a.only and label not in a.only.split(","):
            continue
        name = (label + "".join(f" {o}" for o in own_options(label.split("@")[0], a.option))
                + (f"+{a.correction}" if a.correction else "") + (f" {a.samples}x512" if a.samples else "")
                + (" (other calibration)" if a.calibration else ""))
        keep = Path(a.reports) / (re.sub(r"[^A-Za-z0-9@.+=-]+", "_", name) + ".json") if a.reports else None
        r = quantize_and_measure(a.model, [*flags, *extra], 16384, a.calibration or CALIB, keep)
        r["run"], r["label"] = name, label
        rows.append(r)
        print(json.dumps(r), flush=True)
    print(json.dumps({"bench": "binary_smollm2", "model": a.model, "eval_tokens": 16384, "admm_iters": a.iters,
                      "correction": a.correction or None, "calibration": a.calibration or None,
                      "samples": a.samples or 32,
                      "options": a.option, "results": rows, "checks": checks(rows)}))


if __name__ == "__main__":
    main()
