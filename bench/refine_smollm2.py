"""The pivot and its refiners on SmolLM2-135M: for each setting, the layer-wise pivot (with QEP),
then the pivot refined by each chain of refiners (a separate run from scratch, or with --work a
copy of the previous chain's checkpoint refined by `onecomp refine` where the added refiners can
run on a saved checkpoint). Perplexity
on enwiki_eval, mean KL to the FP model, seconds and peak RSS, one JSON line per run, then one
JSON object with the stage-by-stage checks (each kept stage lowers both ppl and KL).

    OMP_NUM_THREADS=2 python bench/refine_smollm2.py [--settings u4g128,u3g128,u2g64,dbf1.5,mdbf1.5]
        [--chains blockptq] [--option blockptq.epochs=2] [--refine-samples N] [--quick] [--work DIR]
"""
from __future__ import annotations

import argparse
import json

from pathlib import Path

from common import quantize_and_measure, refine_and_measure

SETTINGS = {
    "u4g128": ["--bits", "4", "--group-size", "128", "--projector", "gptq"],
    "u3g128": ["--bits", "3", "--group-size", "128", "--projector", "gptq"],
    "u2g64": ["--bits", "2", "--group-size", "64", "--projector", "gptq"],
    "dbf1.5": ["--format", "dbf", "--projector", "dbf", "--target-bpw", "1.5"],
    "mdbf1.5": ["--format", "mdbf", "--projector", "mdbf", "--target-bpw", "1.5"],
}


def _on_checkpoint(refiners: list[str]) -> bool:
    """Whether every named refiner can run on a saved checkpoint (`onecomp refine`): model
    refiners, and block refiners that say ``on_checkpoint`` (blockptq's Phase 1)."""
    from onecomp_core.plugins import load_plugins
    reg = load_plugins().registry
    return all(reg.get("refiner", n).scopes() == ("model",) or getattr(reg.get("refiner", n), "on_checkpoint", False)
               for n in refiners)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--chains", default="blockptq", help="comma-separated chains, each refiners joined by '+'")
    ap.add_argument("--option", action="append", default=[], help="extra --option for every run")
    ap.add_argument("--refine-samples", type=int, default=0,
                    help="samples the model refiners train on (onecomp's --refine-samples; 0: the layer-wise pass's)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quick", action="store_true", help="4,096 eval tokens instead of 16,384")
    ap.add_argument("--work", type=Path, default=None,
                    help="keep every run's checkpoint under this folder; a chain that extends the one before it "
                         "by refiners that can run on a saved checkpoint (model refiners, blockptq) then refines a "
                         "copy of that checkpoint (`onecomp refine`) instead of "
                         "starting over; each run's JSON row is kept beside its checkpoint (NAME.row.json), and a "
                         "rerun of the bench with the same --work reuses the rows it finds instead of running again")
    a = ap.parse_args()
    tokens = 4096 if a.quick else 16384
    extra = [f for o in a.option for f in ("--option", o)]
    if a.refine_samples:
        extra += ["--refine-samples", str(a.refine_samples)]
    chains = [[]] + [c.split("+") for c in a.chains.split(",") if c]
    rows, checks = [], {}
    for setting in a.settings.split(","):
        prev, prev_chain = None, None
        for chain in chains:
            flags = [*SETTINGS[setting], "--correction", "qep", *[f for r in chain for f in ("--refiner", r)], *extra]
            out = a.work / f"{setting}-{'+'.join(['pivot', *chain])}" if a.work else None
            saved = out.with_name(out.name + ".row.json") if out is not None else None
            if saved is not None and saved.is_file() and out.is_dir():
                r = json.loads(saved.read_text())                  # done by an earlier, interrupted bench run
            else:
                rest = chain[len(prev_chain):] if prev_chain is not None and chain[:len(prev_chain)] == prev_chain else None
                if out is not None and rest and prev is not None and "error" not in prev and _on_checkpoint(rest):
                    r = refine_and_measure(a.work / f"{setting}-{'+'.join(['pivot', *prev_chain])}", out, rest, tokens, extra)
                else:
                    r = quantize_and_measure(a.model, flags, tokens, keep_out=out)
                r.update({"setting": setting, "stages": ["pivot", *chain], "options": a.option,
                          "refine_samples": a.refine_samples or None})
                if saved is not None and "error" not in r:
                    saved.write_text(json.dumps(r))
            prev_chain = chain
            rows.append(r)
            print(json.dumps(r), flush=True)
            if prev is not None and "ppl" in r and "ppl" in prev:
                key = f"{setting}: {'+'.join(chain)} lowers ppl and KL"
                added = r.get("stage_table", [])[-(len(chain) - len(prev["stages"]) + 1):]
                if added and not any(rec.get("kept") for rec in added):
                    checks[key] = "discarded (the checkpoint stays the one before)"   # the check is on kept stages
                else:
                    checks[key] = r["ppl"] < prev["ppl"] and r["kl"] < prev["kl"]
            prev = r
    print(json.dumps({"bench": "refine_smollm2", "eval_tokens": tokens, "calibration_samples": 32, "results": rows,
                      "checks": checks}))


if __name__ == "__main__":
    main()
