"""Plugin glue: registers the ``gptq`` projector."""
from __future__ import annotations

import attrs

from onecomp_core.components import Projector
from onecomp_core.hookspecs import hookimpl
from onecomp_core.projectors import GridOptions
from onecomp_core.validators import boolean, in_range

from .gptq import gptq


@attrs.define(frozen=True)
class GPTQOptions(GridOptions):
    damp: float = attrs.field(default=0.01, validator=in_range(0.0, 10.0))
    block_size: int = attrs.field(default=128, validator=in_range(1, 1 << 20))
    act_order: bool = attrs.field(default=True, validator=boolean)
    static_groups: bool = attrs.field(default=True, validator=boolean)


class GPTQ(Projector):
    """Second-order layer-wise quantization (Frantar et al.): damping, lazy block updates,
    act-order with static groups, optional MSE clipping grid."""
    name = "gptq"
    Options = GPTQOptions

    def project(self, W, H, spec, fmt):
        if spec.format != "uniform":
            raise ValueError(f"projector 'gptq' writes the uniform format, not {spec.format!r}")
        o = self.options
        if o.act_order and not o.static_groups and spec.group_size != -1:
            raise ValueError("gptq: act_order needs static_groups=true (dynamic groups would be fitted "
                             "out of order); set gptq.static_groups=true or gptq.act_order=false")
        codes, scale, zero = gptq(W, H, spec.bits, spec.group_size, spec.symmetric, damp=o.damp,
                                  block_size=o.block_size, act_order=o.act_order,
                                  static_groups=o.static_groups, fit_kwargs=o.fit_kwargs(spec))
        return fmt.make(codes, scale, zero, spec)


@hookimpl
def onecomp_register_projectors(registry):
    registry.add_projector(GPTQ)
