"""Plugin glue: registers the layer-wise refiner ``rescale``."""
from __future__ import annotations

import attrs
import torch

from onecomp_core.components import Refiner
from onecomp_core.hookspecs import hookimpl
from onecomp_core.validators import in_range

from .rescale import layer_error, row_factors


@attrs.define(frozen=True)
class RescaleOptions:
    min_factor: float = attrs.field(default=0.5, validator=in_range(0.0, 1.0))
    max_factor: float = attrs.field(default=2.0, validator=in_range(1.0, 100.0))


class Rescale(Refiner):
    """After each projection, rescale every output row's scales by the least-squares factor
    (see rescale.py). Works on any format whose tensor has a per-row ``scale`` (uniform)."""
    name = "rescale"
    scope = "layer"
    Options = RescaleOptions

    def after_projection(self, ctx, qt):
        if ctx.H is None or not hasattr(qt, "scale"):
            return qt
        H = ctx.H.float()
        wq = qt.dequantize(torch.float32)
        a = row_factors(ctx.target, wq, H, self.options.min_factor, self.options.max_factor)
        new_scale = (qt.scale * a[:, None]).to(ctx.spec.torch_scale_dtype).float()
        candidate = type(qt)(qt.codes, new_scale, qt.zero, qt.bits, qt.group_size, qt.symmetric)
        # keep a row's new scales only where the 16-bit rounding did not undo the gain
        before = layer_error(ctx.target, wq, H)
        after = layer_error(ctx.target, candidate.dequantize(torch.float32), H)
        keep = (after <= before)[:, None]
        candidate.scale = torch.where(keep, new_scale, qt.scale)
        return candidate


@hookimpl
def onecomp_register_refiners(registry):
    registry.add_refiner(Rescale)
