"""Plugin glue: the layer-wise correction ``rescale`` and the preprocessor ``colscale``."""
from __future__ import annotations

import attrs
import torch

from onecomp_core.sdk import Correction, Preprocessor, Transform, hookimpl, in_range

from .colscale import column_scales, fold
from .rescale import layer_error, row_factors


@attrs.define(frozen=True)
class RescaleOptions:
    min_factor: float = attrs.field(default=0.5, validator=in_range(0.0, 1.0))
    max_factor: float = attrs.field(default=2.0, validator=in_range(1.0, 100.0))


class Rescale(Correction):
    """After each projection, rescale every output row's scales by the least-squares factor
    (see rescale.py). Works on any format whose tensor has a per-row ``scale`` (uniform)."""
    name = "rescale"
    statistics = frozenset({"gram"})
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


@attrs.define(frozen=True)
class ColScaleOptions:
    alpha: float = attrs.field(default=0.5, validator=in_range(0.0, 1.0))


class ColumnScaling(Transform):
    """Applied to each block as it is loaded: for every norm the adapter says feeds linears,
    fold s into the norm and the readers' columns (colscale.py)."""

    def __init__(self, adapter, alpha: float):
        self.adapter, self.alpha = adapter, alpha
        self.blocks: list[int] = []             # the blocks it was applied to, in order (for tests and the report)

    def apply_block(self, index, block):
        for norm, readers in self.adapter.norm_inputs(block).items():
            weights = [block.get_submodule(r).weight for r in readers]
            s = column_scales(weights, self.alpha)
            fold(block.get_submodule(norm).weight, self.adapter.norm_offset(block, norm), weights, s)
        self.blocks.append(index)

    def describe(self):
        return {"alpha": self.alpha, "folded_into": "the norms before q/k/v and gate/up (and MoE routers)"}


class ColScale(Preprocessor):
    """Template preprocessor: a per-input-channel scale folded into the preceding norm. It needs
    no calibration data; ``fit`` just binds the options and the model's adapter."""
    name = "colscale"
    Options = ColScaleOptions

    def fit(self, ctx):
        return ColumnScaling(ctx.adapter, self.options.alpha)


@hookimpl
def onecomp_register_refiners(registry):
    registry.add_refiner(Rescale)


@hookimpl
def onecomp_register_preprocessors(registry):
    registry.add_preprocessor(ColScale)
