"""Plugin glue: the ``qep`` correction."""
from __future__ import annotations

import attrs

from onecomp_core.sdk import Correction, excluded, hookimpl, in_range

from .qep import qep_target


def patterns(inst, attr, value):
    if not all(isinstance(p, str) for p in value):
        raise ValueError(f"option {attr.name!r} must be a list of module name patterns, got {value!r}")


@attrs.define(frozen=True)
class QEPOptions:
    alpha: float = attrs.field(default=0.5, validator=in_range(0.0, 2.0))
    damp: float = attrs.field(default=0.01, validator=in_range(0.0, 10.0))
    exclude: tuple = attrs.field(default=(), converter=tuple, validator=patterns)


class QEP(Correction):
    """Quantization error propagation: aim each layer at the FP output from the quantized
    stream's input, W + alpha W C (H^ + lam I)^-1, before any projector runs."""
    name = "qep"
    statistics = frozenset({"gram", "cross"})
    Options = QEPOptions

    def adjust_target(self, ctx):
        cross = ctx.stats.get("cross")
        if cross is None or ctx.H is None or excluded(ctx.name, self.options.exclude):
            return ctx.target
        return self.relaxed_target(ctx, cross.C)

    def relaxed_target(self, ctx, C):
        return qep_target(ctx.target, ctx.H, C, self.options.alpha, self.options.damp)


@hookimpl
def onecomp_register_refiners(registry):
    registry.add_refiner(QEP)
