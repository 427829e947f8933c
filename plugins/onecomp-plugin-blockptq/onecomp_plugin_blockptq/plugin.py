"""Plugin glue: the ``blockptq`` block refiner (block-wise PTQ through trainable views)."""
from __future__ import annotations

import time

import attrs
import torch

from onecomp_core.sdk import BlockRefiner, boolean, hookimpl, in_range, one_of

from .reconstruct import reconstruct, split_rows


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


class BlockPTQ(BlockRefiner):
    """After every linear of a block is quantized: train the block's quantized tensors through
    their formats' trainable views so the block, on the quantized stream, matches the FP block's
    output; write back stored tensors of the same format and bits. The block keeps the result
    only when its error on held-out calibration samples falls."""
    name = "blockptq"
    Options = BlockPTQOptions
    needs_trainable = True
    needs_fp_weights = True          # warm start: code latents placed where the FP weights lie

    def estimate(self, ctx):
        """Extra memory over the layer-wise pass: per quantized weight of the largest block its
        code latent, gradient, materialised weight and the estimator's saved tensors (~20 B;
        +8 B of Adam moments when codes train); an fp32 copy of the block; one step's
        activations (~24 hidden + 8 intermediate values per token, attention scores). Time: the
        probe's fp32 forward + backward of block 0, x 1.3 for the views, per sample, epoch and block."""
        o, cfg = self.options, ctx.model_config
        hidden = int(getattr(cfg, "hidden_size", 0))
        inter = int(getattr(cfg, "intermediate_size", 4 * hidden) or 4 * hidden)
        heads = int(getattr(cfg, "num_attention_heads", 1))
        per_weight = 20 + (8 if o.train_codes else 0)
        tokens = o.batch * ctx.seq_len
        acts = tokens * (24 * hidden + 8 * inter) * 4 + o.batch * heads * ctx.seq_len ** 2 * 4 * 2
        memory = ctx.block_weights * per_weight + ctx.block_params * 4 + acts
        train = max(1, ctx.train_samples - max(1, round(o.heldout * ctx.train_samples)))
        seconds = ctx.num_blocks * o.epochs * train * 1.3 * ctx.time_block_step()
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
                              seed=o.seed + bctx.index, dtype=getattr(torch, o.dtype))
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


@hookimpl
def onecomp_register_refiners(registry):
    registry.add_refiner(BlockPTQ)
