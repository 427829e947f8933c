"""Block refiners on a finished checkpoint (``onecomp refine DIR --refiner blockptq``).

The layer-wise pass runs again over the source model, block by block, with each linear's stored
tensor standing in for its projection: the FP block on the FP stream gives the block's target,
the checkpoint's quantized tensors are loaded into the block, the block refiner acts
(``refine_block``, as inside the pass that made the checkpoint), and the block runs on the
quantized stream into the next. Each finished block is committed to the stage's scratch folder,
so a kill resumes after the last finished block. To the refine stage this is one more model
refiner: it returns the refined stored tensors, which are kept only if the held-out KL falls.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from safetensors import safe_open

from .block_pass import LayerwisePass
from .checkpoint import StoredModules, module_keys, read_meta, stored_modules
from .components import ModelRefiner, Projector
from .errors import OnecompError
from .skeleton import Skeleton
from .store import RunStore
from .streams import capture


class StoredTensors(Projector):
    """Stands in for the projector that wrote a checkpoint: each module's stored tensor, read
    from the checkpoint when its block reaches it (``read``: checkpoint.stored_modules)."""
    name = "stored"
    needs_hessian = False

    def __init__(self, read):
        super().__init__()
        self.read = read

    def project(self, W, H, spec, fmt):
        return self.read[spec.name]


class CheckpointBlocks(ModelRefiner):
    """A block refiner's ``refine_block`` over every block of a finished checkpoint, as one
    model-scope step of the refine stage (record ``scope: "block"``)."""
    scope = "block"

    def __init__(self, inner, plugins, batch: int, pass_estimate=None):
        super().__init__(inner.options)
        self.inner, self.plugins, self.batch = inner, plugins, batch
        self.name = inner.name
        self.pass_estimate = pass_estimate

    def estimate(self, mctx):
        """The layer-wise pass over the checkpoint's blocks on this stage's samples plus the
        block refiner's own estimate (``pass_estimate(rows, checkpoint)`` -> (EstimateContext,
        bytes of that pass), from the runner); None without it."""
        if self.pass_estimate is None:
            return None
        ectx, base = self.pass_estimate(int(mctx.calibration_ids.shape[0]), Path(mctx.checkpoint))
        est = self.inner.estimate(ectx)
        if est is None:
            return None
        return {**est, "memory_bytes": base + int(est.get("memory_bytes", 0))}

    def refine(self, mctx) -> Mapping:
        return refine_blocks(self.inner, mctx, self.plugins, self.batch)


def check_on_checkpoint(refiner, meta: dict) -> None:
    """A block refiner may refine a finished checkpoint when it works in ``refine_block`` alone
    (``on_checkpoint``) and the checkpoint's FP model is the source itself (no transforms)."""
    if not refiner.on_checkpoint:
        raise OnecompError(f"refiner {refiner.name!r} works inside the layer-wise pass as it quantizes, not on a "
                           f"finished checkpoint: quantize again with --refiner {refiner.name}")
    transforms = [t.get("name", "?") for t in meta.get("transforms", [])]
    if transforms:
        raise OnecompError(f"refiner {refiner.name!r} on a finished checkpoint needs the FP model it was quantized "
                           f"from, and this one was transformed first ({', '.join(transforms)}): quantize again "
                           f"with --refiner {refiner.name}")


def refine_blocks(refiner, mctx, plugins, batch: int) -> Mapping:
    """-> {module name: stored tensor} (read when asked) of every quantized module of ``mctx.checkpoint`` after
    ``refiner.refine_block`` acted on each block, on ``mctx.calibration_ids``."""
    run, plan = mctx.run, mctx.plan
    meta = read_meta(Path(mctx.checkpoint))
    check_on_checkpoint(refiner, meta)
    sk = Skeleton(mctx.reference, plugins.registry, mctx.device, run.dtype, run.store_dtype)
    store = RunStore(Path(mctx.scratch) / "blocks", "checkpoint-blocks", overwrite=False)
    stored = StoredTensors(stored_modules(mctx.checkpoint, plugins.registry))
    projectors = {s.projector: stored for s in plan.specs.values()}
    lw = LayerwisePass(sk, plan, projectors, mctx.formats, [], [refiner], store, plugins.hook, needs=set(),
                       batch=batch)
    start = store.finished
    if start < len(sk.blocks):
        inputs, kwargs = capture(sk, mctx.calibration_ids)
        if start:
            streams = store.streams()
            fp, q = streams["fp"].to(mctx.device), streams["q"].to(mctx.device)
        else:
            fp, q = inputs, inputs.clone()
        del inputs
        lw.run(fp, q, kwargs, start)
    where = {name: store.block_file(i) for i in range(len(sk.blocks))
             for name in plan.specs if name.startswith(sk.block_prefix(i) + ".")}
    return committed_blocks(where, mctx.formats, meta)


def committed_blocks(where: dict, formats, meta: dict) -> StoredModules:
    """{module name: its refined stored tensor}, read from the stage's committed block file
    (``where[name]``) when asked, so the refined model is never resident whole (the candidate
    is written a file at a time)."""
    def tensors_of(name):
        with safe_open(str(where[name]), framework="pt") as f:
            return {k: f.get_tensor(k) for k in module_keys(list(f.keys()), name)}
    return StoredModules({name: meta["modules"][name] for name in where}, tensors_of, formats.__getitem__)
