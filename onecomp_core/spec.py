"""What to do with one linear module: the unit a planner emits and a projector consumes."""
from __future__ import annotations

from typing import Any

import attrs
import torch


@attrs.define(frozen=True)
class LayerSpec:
    name: str                      # full module name, e.g. model.layers.0.self_attn.q_proj
    format: str = "uniform"
    projector: str = "rtn"
    bits: int = 4
    group_size: int = 128          # -1: per-channel
    symmetric: bool = False
    scale_dtype: str = "float16"   # 16-bit float the scales are rounded to
    options: dict = attrs.field(factory=dict)

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return getattr(torch, self.scale_dtype)

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.define
class Plan:
    """Per-module specs in execution order; modules absent from the plan stay in full precision."""
    specs: dict[str, LayerSpec] = attrs.field(factory=dict)
    planner: str = "uniform"
    info: dict = attrs.field(factory=dict)              # goes into the run report
    artifacts: dict = attrs.field(factory=dict)         # file name -> bytes, written into the output

    def __contains__(self, name: str) -> bool:
        return name in self.specs

    def __getitem__(self, name: str) -> LayerSpec:
        return self.specs[name]
