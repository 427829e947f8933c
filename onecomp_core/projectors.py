"""Round-to-nearest, the projector built into the core."""
from __future__ import annotations

import attrs

from .components import Projector
from .formats import grid
from .formats.uniform import UniformFormat
from .validators import in_range


@attrs.define(frozen=True)
class GridOptions:
    """Clipping search shared by grid-based projectors: shrink the min/max range over
    ``mse_steps`` factors (0: plain min/max), keep the smallest sum |w - w^|^norm."""
    mse_steps: int = attrs.field(default=0, validator=in_range(0, 1000))
    max_shrink: float = attrs.field(default=0.8, validator=in_range(0.0, 1.0))
    norm: float = attrs.field(default=2.4, validator=in_range(1.0, 10.0))

    def fit_kwargs(self, spec) -> dict:
        return {"mse_steps": self.mse_steps, "max_shrink": self.max_shrink, "norm": self.norm,
                "scale_dtype": spec.torch_scale_dtype}


class RTN(Projector):
    name = "rtn"
    needs_hessian = False
    Options = GridOptions
    writes = (UniformFormat,)

    def project(self, W, H, spec, fmt):
        self.check(spec, fmt)
        codes, scale, zero = grid.rtn(W.float(), spec.bits, spec.group_size, spec.symmetric,
                                      **self.options.fit_kwargs(spec))
        return fmt.make(codes, scale, zero, spec)
