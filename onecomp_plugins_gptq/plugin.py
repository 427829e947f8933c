"""Plugin glue: the ``gptq`` projector."""
from __future__ import annotations

import attrs

from onecomp_core.sdk import GridOptions, OnecompError, Projector, UniformFormat, boolean, hookimpl, in_range, one_of

from .gptq import gptq


@attrs.define(frozen=True)
class GPTQOptions(GridOptions):
    # the clipping search on by default: at 3b/g128 on SmolLM2 it took symmetric GPTQ from 136.2 to
    # 46.7 ppl and asymmetric from 49.5 to 37.7 (docs/benchmarks.md)
    mse_steps: int = attrs.field(default=100, validator=in_range(0, 1000))
    damp: float = attrs.field(default=0.01, validator=in_range(0.0, 10.0))
    block_size: int = attrs.field(default=128, validator=in_range(1, 1 << 20))
    act_order: bool = attrs.field(default=True, validator=boolean)
    static_groups: bool = attrs.field(default=True, validator=boolean)
    # what the clipping search minimises: "none" (sum |w - w^|^norm), "hessian" (each column's
    # error weighed by H_jj) or "output" (the group's output error e H_gg e^T). "hessian" by
    # default: better than "none" in all 12 GPTQ and GPTQ+QEP cells of the peers bench on SmolLM2
    # (3b/g128 symmetric GPTQ 47.06 -> 36.71 ppl; docs/benchmarks.md)
    clip_weight: str = attrs.field(default="hessian", validator=one_of("none", "hessian", "output"))


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
    """GPTQ with the options ``o`` on one module: -> (codes, scale, zero)."""
    return gptq(W, H, spec.bits, spec.group_size, spec.symmetric, damp=o.damp, block_size=o.block_size,
                act_order=o.act_order, static_groups=o.static_groups, fit_kwargs=o.fit_kwargs(spec),
                clip_weight=o.clip_weight)


class GPTQ(UniformProjector):
    """Second-order layer-wise quantization (Frantar et al.): damping, lazy block updates,
    act-order with static groups, optional MSE clipping grid."""
    name = "gptq"
    Options = GPTQOptions

    def project(self, W, H, spec, fmt):
        self.check(spec, fmt)
        return fmt.make(*run_gptq(self.options, W, H, spec), spec)


@hookimpl
def onecomp_register_projectors(registry):
    registry.add_projector(GPTQ)
