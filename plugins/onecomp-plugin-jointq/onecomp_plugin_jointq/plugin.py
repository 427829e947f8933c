"""Plugin glue: the ``jointq`` projector (builds on onecomp-plugins-gptq's public API)."""
from __future__ import annotations

import attrs

from onecomp_core.sdk import grid, hookimpl, in_range, one_of
from onecomp_plugins_gptq import GPTQOptions, UniformProjector, run_gptq

from .jointq import jointq


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


@hookimpl
def onecomp_register_projectors(registry):
    registry.add_projector(JointQ)
