"""The model-refiner stage: each model refiner, in config order, works on the current checkpoint
(the pivot, then whatever the refiners before it left) and returns new quantized tensors for the
modules it changed. The result is kept only if the held-out calibration metric, the mean
per-token KL(P_FP || P_quantized) on calibration samples no refiner trains on, does not get
worse; kept tensors replace the committed blocks. Each outcome is recorded, so a resumed run
skips the refiners already done."""
from __future__ import annotations

import shutil
import time

from safetensors.torch import load_file

from .checkpoint import load_quantized, quantized_tensors
from .contexts import ModelContext
from .errors import OnecompError
from .evaluate import evaluate, load_reference


def heldout_kl(model, ref, ids) -> float:
    """Mean per-token KL(P_ref || P_model) over the held-out samples (one window each)."""
    return float(evaluate(model, ids.reshape(-1), ref=ref, seq_len=ids.shape[1])["kl"])


def block_index(runner, name: str) -> int:
    sk = runner.sk
    return next(i for i in range(len(sk.blocks)) if name.startswith(sk.block_prefix(i) + "."))


def updated_blocks(runner, refiner_name: str, result: dict) -> dict[int, dict]:
    """The committed block files with ``result``'s tensors in place; every returned tensor must
    be stored exactly as the module's format stores it (same keys, shapes and dtypes)."""
    plan, formats, store = runner.plan_, runner.res.formats, runner.store
    blocks: dict[int, dict] = {}
    for name, qt in result.items():
        if name not in plan:
            raise OnecompError(f"model refiner {refiner_name!r} returned {name!r}, which is not a quantized module")
        i = block_index(runner, name)
        if i not in blocks:
            blocks[i] = load_file(str(store.block_file(i)))
        new = formats[plan[name].format].to_tensors(name, qt, runner.sk.checkpoint_dtype)
        for k, t in new.items():
            old = blocks[i].get(k)
            if old is None or old.shape != t.shape or old.dtype != t.dtype:
                was = "absent" if old is None else f"{tuple(old.shape)} {old.dtype}"
                raise OnecompError(f"model refiner {refiner_name!r} changed how {name} is stored ({k}: {was} -> "
                                   f"{tuple(t.shape)} {t.dtype}); a refiner must keep the module's format and bits")
            blocks[i][k] = t.detach().cpu().contiguous()
    return blocks


def swap_modules(runner, model, result: dict) -> None:
    """Put ``result``'s tensors into a loaded model, as the format's inference modules."""
    for name, qt in result.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        bias = getattr(old, "bias", None)
        fmt = runner.res.formats[runner.plan_[name].format]
        setattr(parent, child, fmt.module(qt, None if bias is None else bias.detach()).to(runner.device))


def run_model_refiners(runner) -> list[dict]:
    run, store = runner.run_cfg, runner.store
    done = {r["name"]: r for r in store.refined()}
    pivot = store.work / "pivot"

    def write_pivot():
        if pivot.exists():
            shutil.rmtree(pivot)
        pivot.mkdir(parents=True)
        runner.res.exporters[0].export(runner.export_context(pivot))      # the main checkpoint only

    def load():
        return load_quantized(pivot, run.device, run.dtype, runner.res.plugins)

    ref = load_reference(str(runner.folder), run.device, run.dtype)[0]
    write_pivot()
    before = heldout_kl(load(), ref, runner.heldout_ids)
    records = []
    for refiner in runner.res.refiners_of("model"):
        if refiner.name in done:
            records.append(done[refiner.name])
            before = done[refiner.name]["after"] if done[refiner.name]["kept"] else before
            continue
        t0 = time.time()
        mctx = ModelContext(checkpoint=pivot, reference=runner.folder, plan=runner.plan_, formats=runner.res.formats,
                            calibration_ids=runner.ids, heldout_ids=runner.heldout_ids, device=runner.device,
                            load=load, load_reference=lambda: ref, run=run,
                            quantized=lambda: quantized_tensors(pivot, runner.res.plugins.registry),
                            scratch=store.work / f"refiner-{refiner.name}")
        result = refiner.refine(mctx) or {}
        record = {"name": refiner.name, "modules": len(result), "before": before, "after": before, "kept": False}
        blocks = None
        if result:
            blocks = updated_blocks(runner, refiner.name, result)
            model = load()
            swap_modules(runner, model, result)
            record["after"] = heldout_kl(model, ref, runner.heldout_ids)
            record["kept"] = record["after"] <= before
        record["seconds"] = round(time.time() - t0, 2)
        store.record_refined(record, blocks if record["kept"] else None)
        if record["kept"]:
            before = record["after"]
            write_pivot()
        records.append(record)
    shutil.rmtree(pivot, ignore_errors=True)
    return records
