"""Which held-out samples judge a refine stage as the evaluation text does: the held-out KL of
saved SmolLM2 checkpoints (e.g. a pivot and the same pivot + blockptq) on several sets of
calibration samples the refiners never trained on (enwiki_calib in chunks of 512 tokens; the
first 32 train the layer-wise pass, 4 more the model refiners): the chunks right after the
training ones (the old default) and sets spread evenly over the rest of the text. One JSON line
per checkpoint.

    OMP_NUM_THREADS=2 python bench/heldout_sets.py CHECKPOINT... [--sets adjacent4,spread4,spread8]
"""
from __future__ import annotations

import argparse
import json

from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TRAIN, CHUNKS = 36, 800


def held_out_sets(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    rest = ids[TRAIN:]
    sets = {f"adjacent{m}": rest[:m] for m in (4, 8)}
    sets.update({f"spread{m}": rest[::len(rest) // m][:m] for m in (4, 8, 16, 64)})
    return sets


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--sets", default="adjacent4,spread4,spread8")
    ap.add_argument("--model", default="smollm2-135m")
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import onecomp_core
    from onecomp_core.calibration import bos_id, calibration_samples
    from onecomp_core.model_source import resolve_model
    from onecomp_core.refine_stage import heldout_kl
    model = str(resolve_model(a.model))
    tok = AutoTokenizer.from_pretrained(model)
    ids = calibration_samples(str(ROOT / "data" / "enwiki_calib.txt"), tok, CHUNKS, 512, bos=bos_id(tok, "auto"))
    sets = held_out_sets(ids)
    unknown = [s for s in a.sets.split(",") if s not in sets]
    if unknown:
        raise SystemExit(f"unknown set {unknown[0]!r}; known: {', '.join(sets)}")
    fp = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    for ck in a.checkpoints:
        q = onecomp_core.load_quantized(ck, "cpu")
        print(json.dumps({"checkpoint": ck, **{s: round(heldout_kl(q, fp, sets[s]), 4) for s in a.sets.split(",")}}),
              flush=True)


if __name__ == "__main__":
    main()
