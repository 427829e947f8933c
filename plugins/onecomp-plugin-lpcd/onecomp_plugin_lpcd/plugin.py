"""Plugin glue: ``lpcd``, a correction (the closed-form first pass) and a block refiner (the
later coordinate-descent passes). Math from onecomp-plugin-qep and onecomp-plugin-blockcomp."""
from __future__ import annotations

import attrs

from onecomp_core.sdk import BlockRefiner, boolean, hookimpl, in_range
from onecomp_plugin_blockcomp import compensate
from onecomp_plugin_qep import QEP, patterns, writer_target


@attrs.define(frozen=True)
class LPCDOptions:
    alpha: float = attrs.field(default=0.5, validator=in_range(0.0, 2.0))
    damp: float = attrs.field(default=0.01, validator=in_range(0.0, 10.0))
    residual: bool = attrs.field(default=True, validator=boolean)
    iterations: int = attrs.field(default=1, validator=in_range(1, 4))
    exclude: tuple = attrs.field(default=(), converter=tuple, validator=patterns)
    relax_steps: int = attrs.field(default=16, validator=in_range(0, 10_000))
    relax_lr: float = attrs.field(default=1e-3, validator=in_range(0.0, 1.0))
    relax_batch: int = attrs.field(default=2, validator=in_range(1, 4096))
    relax_eval: int = attrs.field(default=4, validator=in_range(1, 4096))
    seed: int = attrs.field(default=0, validator=in_range(0, 2**31))


class LPCD(QEP, BlockRefiner):
    """Submodule-level relax-then-project coordinate descent. Inside each coupled submodule the
    adapter declares (QK, VO, gate-up-down), every layer is relaxed in full precision with the
    others fixed at their quantized values, then projected by the projector.

    First pass (a correction, closed form): inner layers (q, k, v, gate, up) towards their FP
    output from the quantized input (the QEP step); the submodule's writer into the residual
    stream (o_proj, down_proj) towards the FP submodule output plus, with ``residual``, the
    residual-stream error at its add (h - h^). Later passes (``iterations`` > 1, a block
    refiner): every other linear of the block is quantized; each group goes back to FP, inner
    layers are relaxed from their last target by Adam steps against the FP block output
    (non-quadratic through softmax / SiLU; kept only if the held-out block error drops),
    writers again in closed form with the new statistics; the group is projected again and
    the result kept only if the block's output error does not rise."""
    name = "lpcd"
    Options = LPCDOptions
    needs_fp_weights = True

    def __init__(self, options=None):
        super().__init__(options)
        self._relaxed: set = set()                      # inner layers relaxed by Adam in this pass
        self._targets: dict = {}                        # last relaxed target of each inner layer

    @property
    def statistics(self) -> frozenset:
        return frozenset({"gram", "cross", "residual"} if self.options.residual else {"gram", "cross"})

    # -- layer scope: the closed-form relaxation -----------------------------------------------
    def relaxed_target(self, ctx, C):
        R = ctx.stats.get("residual") if self.options.residual else None
        if R is not None:               # writers: closed form, from FP, in every pass
            return writer_target(ctx.target, ctx.H, C, R.R, self.options.alpha, self.options.damp)
        # inner layers: the QEP step in the first pass; later passes already relaxed them against
        # the block output from the quantized stream. Kept so that the next pass continues from it.
        target = ctx.target if ctx.name in self._relaxed else super().relaxed_target(ctx, C)
        if self.options.iterations > 1:
            self._targets[ctx.name] = target.detach().clone()
        return target

    # -- block scope: passes 2..iterations -------------------------------------------------------
    def refine_block(self, bctx):
        try:
            err = None                                   # block error of the kept weights
            for p in range(1, self.options.iterations):
                for group in bctx.groups:
                    snap = bctx.snapshot(group)
                    err = bctx.error() if err is None else err
                    bctx.restore_fp(group)
                    self._relax_inner(bctx, group, p)
                    bctx.quantize_group(group, pass_index=p)
                    after = bctx.error()
                    if after > err:                      # coordinate descent never goes uphill
                        bctx.restore(snap)
                    else:
                        err = after
        finally:
            self._targets, self._relaxed = {}, set()

    def _relax_inner(self, bctx, group, p):
        """Continue the inner layers' relaxation from the last one (the first pass's QEP step),
        now with every other linear quantized, by Adam against the FP block output."""
        self._relaxed = set()
        o = self.options
        inner = [n for n in group if n not in bctx.residual_writers and bctx.full(n) in self._targets]
        if not inner:
            return
        params = [bctx.module(n).weight for n in inner]
        for n, w in zip(inner, params):
            w.data.copy_(self._targets.pop(bctx.full(n)).to(w))
        if o.relax_steps:
            compensate(bctx.block, params, bctx.q_inputs, bctx.fp_outputs, bctx.kwargs, steps=o.relax_steps,
                       lr=o.relax_lr, batch=o.relax_batch, eval_samples=o.relax_eval, seed=o.seed + p)
        self._relaxed = {bctx.full(n) for n in inner}


@hookimpl
def onecomp_register_refiners(registry):
    registry.add_refiner(LPCD)
