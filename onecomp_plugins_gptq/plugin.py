"""Plugin glue: the ``gptq`` and ``jointq`` projectors and the ``qep`` correction."""
from __future__ import annotations

import attrs
import torch

from onecomp_core.components import Projector, Refiner
from onecomp_core.errors import OnecompError
from onecomp_core.formats import grid
from onecomp_core.formats.uniform import UniformFormat
from onecomp_core.hookspecs import hookimpl
from onecomp_core.planners import excluded
from onecomp_core.projectors import GridOptions
from onecomp_core.validators import boolean, in_range, one_of

from .gptq import gptq
from .jointq import jointq
from .blockcomp import compensate
from .qep import CrossAccumulator, ResidualAccumulator, lpcd_writer_target, qep_target


@attrs.define(frozen=True)
class GPTQOptions(GridOptions):
    damp: float = attrs.field(default=0.01, validator=in_range(0.0, 10.0))
    block_size: int = attrs.field(default=128, validator=in_range(1, 1 << 20))
    act_order: bool = attrs.field(default=True, validator=boolean)
    static_groups: bool = attrs.field(default=True, validator=boolean)


class UniformProjector(Projector):
    """A GPTQ-family projector: writes the uniform format; act-order with grouped columns needs
    static groups (dynamic ones would be fitted out of order)."""
    writes = (UniformFormat,)

    def check(self, spec, fmt):
        super().check(spec, fmt)
        o = self.options
        if o.act_order and not o.static_groups and spec.group_size != -1:
            raise OnecompError(f"{self.name}: act_order needs static_groups=true with group size {spec.group_size}; "
                               f"set {self.name}.static_groups=true or {self.name}.act_order=false")


def run_gptq(o: GPTQOptions, W, H, spec):
    return gptq(W, H, spec.bits, spec.group_size, spec.symmetric, damp=o.damp, block_size=o.block_size,
                act_order=o.act_order, static_groups=o.static_groups, fit_kwargs=o.fit_kwargs(spec))


class GPTQ(UniformProjector):
    """Second-order layer-wise quantization (Frantar et al.): damping, lazy block updates,
    act-order with static groups, optional MSE clipping grid."""
    name = "gptq"
    Options = GPTQOptions

    def project(self, W, H, spec, fmt):
        self.check(spec, fmt)
        return fmt.make(*run_gptq(self.options, W, H, spec), spec)


@attrs.define(frozen=True)
class JointQOptions(GPTQOptions):
    lam: float = attrs.field(default=0.0, validator=in_range(0.0, 100.0))
    max_rounds: int = attrs.field(default=3, validator=in_range(1, 1000))
    start: str = attrs.field(default="gptq", validator=one_of("gptq", "rtn"))


class JointQ(UniformProjector):
    """Joint local search over codes and group scales from a GPTQ (or RTN) start; writes the
    same uniform format and never ends worse than its start on its own objective."""
    name = "jointq"
    Options = JointQOptions

    def project(self, W, H, spec, fmt):
        self.check(spec, fmt)
        o = self.options
        if o.start == "gptq":
            codes, scale, zero = run_gptq(o, W, H, spec)
        else:
            codes, scale, zero = grid.rtn(W.float(), spec.bits, spec.group_size, spec.symmetric, **o.fit_kwargs(spec))
        codes, scale, zero = jointq(W, H, codes, scale, zero, spec.bits, spec.group_size, lam=o.lam,
                                    max_rounds=o.max_rounds, scale_dtype=spec.torch_scale_dtype)
        return fmt.make(codes, scale, zero, spec)


def _patterns(inst, attr, value):
    if not all(isinstance(p, str) for p in value):
        raise ValueError(f"option {attr.name!r} must be a list of module name patterns, got {value!r}")


@attrs.define(frozen=True)
class QEPOptions:
    alpha: float = attrs.field(default=0.5, validator=in_range(0.0, 2.0))
    damp: float = attrs.field(default=0.01, validator=in_range(0.0, 10.0))
    exclude: tuple = attrs.field(default=(), converter=tuple, validator=_patterns)


class QEP(Refiner):
    """Quantization error propagation: aim each layer at the FP output from the quantized
    stream's input, W + alpha W C (H^ + lam I)^-1, before any projector runs."""
    name = "qep"
    scope = "layer"
    wants_fp_inputs = True
    Options = QEPOptions

    def __init__(self, options=None):
        super().__init__(options)
        self.cross: dict[str, CrossAccumulator] = {}

    def begin_group(self, names):
        self.cross = {}

    def observe(self, name, x_fp, x_q):
        if name not in self.cross:
            self.cross[name] = CrossAccumulator(x_q.shape[-1], x_q.device)
        self.cross[name].add(x_fp, x_q)

    def adjust_target(self, ctx):
        acc = self.cross.get(ctx.name)
        if acc is None or ctx.H is None or excluded(ctx.name, self.options.exclude):
            return ctx.target
        return self.relaxed_target(ctx, acc.C)

    def relaxed_target(self, ctx, C):
        return qep_target(ctx.target, ctx.H, C, self.options.alpha, self.options.damp)


@attrs.define(frozen=True)
class LPCDOptions:
    alpha: float = attrs.field(default=0.5, validator=in_range(0.0, 2.0))
    damp: float = attrs.field(default=0.01, validator=in_range(0.0, 10.0))
    residual: bool = attrs.field(default=True, validator=boolean)
    iterations: int = attrs.field(default=1, validator=in_range(1, 4))
    exclude: tuple = attrs.field(default=(), converter=tuple, validator=_patterns)
    relax_steps: int = attrs.field(default=16, validator=in_range(0, 10_000))
    relax_lr: float = attrs.field(default=1e-3, validator=in_range(0.0, 1.0))
    relax_batch: int = attrs.field(default=2, validator=in_range(1, 4096))
    relax_eval: int = attrs.field(default=4, validator=in_range(1, 4096))
    seed: int = attrs.field(default=0, validator=in_range(0, 2**31))


class LPCD(QEP):
    """Submodule-level relax-then-project coordinate descent. Inside each coupled submodule the
    adapter declares (QK, VO, gate-up-down), every layer is relaxed in full precision with the
    others fixed at their quantized values, then projected by the projector.

    First pass (closed form): inner layers (q, k, v, gate, up) towards their FP output from the
    quantized input (the QEP step); the submodule's writer into the residual stream (o_proj,
    down_proj) towards the FP submodule output plus, with ``residual``, the residual-stream
    error at its add (h - h^). Later passes (``iterations`` > 1): every other linear of the
    block is quantized; inner layers are relaxed from their FP weights by Adam steps against
    the FP block output (non-quadratic through softmax / SiLU; kept only if the held-out
    block error drops), writers again in closed form with the new statistics."""
    name = "lpcd"
    Options = LPCDOptions

    def __init__(self, options=None):
        super().__init__(options)
        self.resid: dict[str, ResidualAccumulator] = {}
        self._last_x: dict[str, torch.Tensor] = {}
        self._relaxed: set = set()
        self._targets: dict[str, torch.Tensor] = {}     # last relaxed target of each inner layer

    @property
    def block_passes(self) -> int:
        return self.options.iterations

    def prepare_group(self, gctx):
        self._relaxed = set()
        if gctx.pass_index == 0 and not gctx.quantized:      # a new block
            self._targets = {}
        o = self.options
        inner = [n for n in gctx.group if n not in gctx.residual_writers
                 and f"{gctx.prefix}.{n}" in self._targets]
        if gctx.pass_index == 0 or not inner:
            return
        # continue the relaxation from the last one (the first pass's closed-form QEP step),
        # now with every other linear quantized, by Adam against the FP block output
        params = [gctx.block.get_submodule(n).weight for n in inner]
        with torch.no_grad():
            for n, w in zip(inner, params):
                w.copy_(self._targets.pop(f"{gctx.prefix}.{n}").to(w))
        if o.relax_steps:
            compensate(gctx.block, params, gctx.q_inputs, gctx.fp_outputs, gctx.kwargs, steps=o.relax_steps,
                       lr=o.relax_lr, batch=o.relax_batch, eval_samples=o.relax_eval, seed=o.seed + gctx.pass_index)
        self._relaxed = {f"{gctx.prefix}.{n}" for n in inner}

    def begin_group(self, names):
        super().begin_group(names)
        self.resid, self._last_x = {}, {}

    def observe(self, name, x_fp, x_q):
        super().observe(name, x_fp, x_q)
        self._last_x[name] = x_q

    def observe_residual(self, name, r_fp, r_q):
        if not self.options.residual or name not in self._last_x:
            return
        x = self._last_x.pop(name)
        if name not in self.resid:
            self.resid[name] = ResidualAccumulator(r_fp.shape[-1], x.shape[-1], x.device)
        self.resid[name].add(r_fp, r_q, x)

    def relaxed_target(self, ctx, C):
        r = self.resid.get(ctx.name)
        if r is not None:               # writers: closed form, from FP, in every pass
            return lpcd_writer_target(ctx.target, ctx.H, C, r.R, self.options.alpha, self.options.damp)
        # inner layers: the QEP step in the first pass; later passes already relaxed them against
        # the block output from the quantized stream. Kept so that the next pass continues from it.
        target = ctx.target if ctx.name in self._relaxed else super().relaxed_target(ctx, C)
        if self.options.iterations > 1:
            self._targets[ctx.name] = target.detach().clone()
        return target


@attrs.define(frozen=True)
class BlockCompOptions:
    steps: int = attrs.field(default=8, validator=in_range(0, 10_000))
    lr: float = attrs.field(default=1e-3, validator=in_range(0.0, 1.0))
    batch: int = attrs.field(default=2, validator=in_range(1, 4096))
    eval_samples: int = attrs.field(default=4, validator=in_range(1, 4096))
    seed: int = attrs.field(default=0, validator=in_range(0, 2**31))


class BlockCompensation(Refiner):
    """Before each group of a block is quantized: a few Adam steps on the block's still-FP
    linears (the group included) so the partly quantized block matches the FP block output;
    kept only when it lowers the block error on held samples."""
    name = "blockcomp"
    scope = "layer"
    Options = BlockCompOptions

    def prepare_group(self, gctx):
        names = [n for n, m in gctx.block.named_modules() if isinstance(m, torch.nn.Linear)
                 and n not in gctx.quantized and n.rsplit(".", 1)[-1] not in ("gate",)]
        params = [gctx.block.get_submodule(n).weight for n in names]
        o = self.options
        compensate(gctx.block, params, gctx.q_inputs, gctx.fp_outputs, gctx.kwargs, steps=o.steps,
                   lr=o.lr, batch=o.batch, eval_samples=o.eval_samples, seed=o.seed)


@hookimpl
def onecomp_register_projectors(registry):
    registry.add_projector(GPTQ)
    registry.add_projector(JointQ)


@hookimpl
def onecomp_register_refiners(registry):
    registry.add_refiner(QEP)
    registry.add_refiner(LPCD)
    registry.add_refiner(BlockCompensation)
