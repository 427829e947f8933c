"""Plugin glue: the ``blockptq`` block refiner (block-wise PTQ through trainable views)."""
from __future__ import annotations

import time

import attrs
import torch

from onecomp_core.sdk import (BlockRefiner, ModelContext, ModelRefiner, atomic_torch_save, attach_views, boolean,
                              find_adapter, hookimpl, in_range, load_plugins, one_of, rss_bytes)

from .reconstruct import reconstruct, split_rows
from .windows import capture, params_of, refine_windows


@attrs.define(frozen=True)
class BlockPTQOptions:
    epochs: int = attrs.field(default=4, validator=in_range(0, 10_000))
    batch: int = attrs.field(default=1, validator=in_range(1, 4096))             # samples per Adam step
    lr_scales: float = attrs.field(default=5e-3, validator=in_range(0.0, 1.0))   # relative to each tensor's RMS
    lr_codes: float = attrs.field(default=5e-3, validator=in_range(0.0, 10.0))   # in grid steps
    train_codes: bool = attrs.field(default=True, validator=boolean)
    warm_start: bool = attrs.field(default=True, validator=boolean)                # latents where the FP weights lie
    beta: float = attrs.field(default=0.0, validator=in_range(0.0, 100.0))       # weight of (1 - cosine)
    tau0: float = attrs.field(default=1.0, validator=in_range(1e-4, 100.0))      # estimator temperature, start
    tau1: float = attrs.field(default=0.05, validator=in_range(1e-4, 100.0))     # ... and end
    clip: float = attrs.field(default=1.0, validator=in_range(0.0, 1e6))         # gradient norm; 0: none
    heldout: float = attrs.field(default=0.1, validator=in_range(0.0, 0.9))      # share of samples judging a block
    dtype: str = attrs.field(default="float32", validator=one_of("float32", "bfloat16"))
    seed: int = attrs.field(default=0, validator=in_range(0, 2**31))
    # Phase 2: windows of two adjacent blocks, on the pivot (a model-scope stage after the layer-wise pass)
    windows: bool = attrs.field(default=False, validator=boolean)
    window_epochs: int = attrs.field(default=2, validator=in_range(0, 10_000))


class BlockPTQ(BlockRefiner, ModelRefiner):
    """Phase 1 (block scope): after every linear of a block is quantized, train the block's
    quantized tensors through their formats' trainable views so the block, on the quantized
    stream, matches the FP block's output; write back stored tensors of the same format and
    bits. The block keeps the result only when its error on held-out calibration samples falls.
    Phase 2 (model scope, ``windows=true``): on the pivot, windows of two adjacent blocks trained
    against the FP pair's output, each pair rolled back when its held-out error rises."""
    name = "blockptq"
    Options = BlockPTQOptions
    needs_trainable = True
    needs_fp_weights = True          # warm start: code latents placed where the FP weights lie
    data_parallel = True             # ranks train on their shards, gradients averaged, errors reduced
    on_checkpoint = True             # Phase 1 also refines a finished pivot's blocks (`onecomp refine`)

    def active_scopes(self):
        return ("block", "model") if self.options.windows else ("block",)

    def estimate(self, ctx):
        """Phase 2's estimate when asked with the ModelContext of the refine stage, else Phase 1's."""
        return self._estimate_windows(ctx) if isinstance(ctx, ModelContext) else self._estimate_block(ctx)

    def _estimate_windows(self, mctx):
        """Phase 2's predicted peak: what is resident now (the teacher is loaded by then) + the
        student and, per quantized weight, its view (latent, materialised weight, estimator
        tensors, Adam moments: ~32 B) + two blocks' activations per step. Time: unknown."""
        teacher = mctx.load_reference()
        weights = sum(teacher.get_submodule(name).weight.numel() for name in mctx.plan.specs)  # the plan's modules
        params = sum(p.numel() for p in teacher.parameters())
        cfg = teacher.config
        hidden = int(getattr(cfg, "hidden_size", 0))
        inter = int(getattr(cfg, "intermediate_size", 4 * hidden) or 4 * hidden)
        tokens = self.options.batch * int(mctx.calibration_ids.shape[1])
        acts = 2 * tokens * (24 * hidden + 8 * inter) * 4
        streams = 3 * mctx.calibration_ids.numel() * hidden * 4
        return {"memory_bytes": int(rss_bytes() + 4 * params + 32 * weights + acts + streams), "seconds": None}

    def _estimate_block(self, ctx):
        """Extra memory over the layer-wise pass: per quantized weight of the largest block its
        code latent, gradient, materialised weight and the estimator's saved tensors (~20 B;
        +8 B of Adam moments when codes train); an fp32 copy of the block; one step's
        activations (~24 hidden + 8 intermediate values per token, attention scores). Time: the
        probe's fp32 forward + backward of block 0 (x 1.3 for the views, unless the probe trained
        through them: ``step_with_views``), per sample, epoch and block."""
        o, cfg = self.options, ctx.model_config
        hidden = int(getattr(cfg, "hidden_size", 0))
        inter = int(getattr(cfg, "intermediate_size", 4 * hidden) or 4 * hidden)
        heads = int(getattr(cfg, "num_attention_heads", 1))
        per_weight = 20 + (8 if o.train_codes else 0)
        tokens = o.batch * ctx.seq_len
        acts = tokens * (24 * hidden + 8 * inter) * 4 + o.batch * heads * ctx.seq_len ** 2 * 4 * 2
        memory = ctx.block_weights * per_weight + ctx.block_params * 4 + acts
        train = max(1, ctx.train_samples - max(1, round(o.heldout * ctx.train_samples)))
        views = 1.0 if getattr(ctx, "step_with_views", False) else 1.3
        seconds = ctx.num_blocks * o.epochs * train * views * ctx.time_block_step()
        return {"memory_bytes": int(memory), "seconds": seconds}

    def refine_block(self, bctx):
        o = self.options
        rels = [r for r in bctx.linears if bctx.full(r) in bctx.qts]
        if not rels:
            return
        t0 = time.time()
        views = {r: bctx.format(r).trainable(bctx.qts[bctx.full(r)], bctx.spec(r)) for r in rels}
        if o.warm_start:
            for r, v in views.items():
                v.warm_start(bctx.fp_weight(r).float())
        train_rows, eval_rows = split_rows(bctx.q_inputs.shape[0], o.heldout, o.seed + bctx.index)
        before = bctx.error(eval_rows)
        snap = bctx.snapshot(rels)
        history = reconstruct(bctx.block, views, bctx.q_inputs, bctx.fp_outputs, bctx.kwargs, train_rows,
                              epochs=o.epochs, batch=o.batch, lr={"scales": o.lr_scales, "codes": o.lr_codes},
                              train={"codes": o.train_codes}, beta=o.beta, tau0=o.tau0, tau1=o.tau1, clip=o.clip,
                              seed=o.seed + bctx.index, dtype=getattr(torch, o.dtype), sync=bctx.sync_gradients,
                              steps_per_epoch=bctx.max_over_ranks(-(-len(train_rows) // o.batch)))
        with torch.no_grad():
            for r, v in views.items():
                bctx.set_quantized(r, v.write_back())
        after = bctx.error(eval_rows)
        kept = after < before
        if not kept:
            bctx.restore(snap, rejected=False)
        record = {"heldout_before": before, "heldout_after": after, "kept": kept,
                  "train_loss": [round(x, 8) for x in history], "seconds": round(time.time() - t0, 2)}
        for r in rels:
            bctx.info[bctx.full(r)]["blockptq"] = record


    def refine(self, mctx):
        """Phase 2 on the checkpoint in ``mctx``: every window of two adjacent blocks in turn,
        resumable after the last finished window (state in ``mctx.scratch``)."""
        o = self.options
        teacher = mctx.load_reference()
        student = mctx.load()
        views = attach_views(student, mctx.quantized(), mctx.plan, mctx.formats)
        for p in student.parameters():        # the views' parameters train (the optimizer asks
            p.requires_grad_(False)           # requires_grad), nothing else of the student
        for p in params_of(views):
            p.data = p.data.float()
            p.requires_grad_(True)
        path = find_adapter(student.config, load_plugins().registry).blocks_path()
        s_blocks, t_blocks = student.get_submodule(path), teacher.get_submodule(path)
        block_views = [{n[len(f"{path}.{i}."):]: v for n, v in views.items() if n.startswith(f"{path}.{i}.")}
                       for i in range(len(s_blocks))]
        ids, device = mctx.calibration_ids, mctx.device
        scratch = mctx.scratch
        carry = _load(scratch / "carry.pt") if scratch is not None else None
        if carry is not None:                 # resume after the last finished window
            start = carry["next"]
            for i in range(start):
                _set(block_views[i], _load(scratch / f"block-{i}.pt")["params"])
            _set(block_views[start], carry["params"])
            x_fp, x_q, records = carry["x_fp"], carry["x_q"], carry["records"]
            _, kwargs = capture(teacher, t_blocks, ids[:1], device)
        else:
            start, records = 0, []
            x_fp, kwargs = capture(teacher, t_blocks, ids, device)
            x_q, _ = capture(student, s_blocks, ids, device)

        def on_window(i, x_fp, x_q, record):
            records.append(record)
            print(f"[blockptq] window {i}-{i + 1}: held-out {record['heldout_before']:.4g} -> "
                  f"{record['heldout_after']:.4g}, {'kept' if record['kept'] else 'rolled back'}", flush=True)
            if scratch is None:
                return
            scratch.mkdir(parents=True, exist_ok=True)
            atomic_torch_save(scratch / f"block-{i}.pt", {"params": _get(block_views[i])})
            atomic_torch_save(scratch / "carry.pt", {"next": i + 1, "params": _get(block_views[i + 1]),
                                                     "x_fp": x_fp, "x_q": x_q, "records": records})

        refine_windows(t_blocks, s_blocks, block_views, x_fp, x_q, kwargs, start=start, on_window=on_window,
                       epochs=o.window_epochs, batch=o.batch, lr={"scales": o.lr_scales, "codes": o.lr_codes},
                       train={"codes": o.train_codes}, beta=o.beta, tau0=o.tau0, tau1=o.tau1, clip=o.clip,
                       heldout=o.heldout, seed=o.seed + 1000, dtype=getattr(torch, o.dtype))
        self.windows = records
        with torch.no_grad():
            return {name: v.write_back() for name, v in views.items()}


def _get(views: dict) -> list:
    return [p.detach().cpu().clone() for p in params_of(views)]


def _set(views: dict, saved: list) -> None:
    with torch.no_grad():
        for p, s in zip(params_of(views), saved):
            p.copy_(s.to(p.device, p.dtype))


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


@hookimpl
def onecomp_register_refiners(registry):
    registry.add_refiner(BlockPTQ)
