"""The format interface every quantized representation implements."""
from __future__ import annotations

from typing import ClassVar

import attrs
import torch

from ..errors import OnecompError
from ..spec import LayerSpec


class Format:
    """A quantized representation. Subclasses set ``name`` and implement the methods below.

    - ``check(spec, shape)``: raise :class:`OnecompError` for a spec the format cannot hold
    - ``bits_per_weight(spec, shape)``: every stored bit (codes and metadata) / weights
    - ``stored_bits_per_weight(spec, shape, qt)``: the same for a tensor the projector produced
      (defaults to ``bits_per_weight``; formats whose projector may pick a smaller structure
      per module, like ``mdbf``'s envelope rank, count what ``qt`` holds)
    - ``structure(qt)``: facts about what ``qt`` holds that the report records per module,
      e.g. a binary factorisation's rank k and envelope rank l (defaults to none)
    - ``settle(specs, shapes)``: called with the plan's modules in this format once the plan is
      known (every quantize and refine run, every rank), before any tensor is written: storage
      choices that depend on the whole plan (default: none)
    - ``to_tensors(prefix, qt, dtype)`` / ``from_tensors(prefix, tensors, meta)``: disk layout
    - ``module(qt, bias)``: an ``nn.Module`` that runs the quantized layer (inference)
    - ``checkpoint_config(entries)``: what ``config.json`` says about the quantization (or None)
    - ``exporters``: the exporters that can carry the format (an exporter may accept more
      through its own ``check``); a run asking for another stops before quantization
    - ``trainable(qt, spec)``: a :class:`~onecomp_core.formats.trainable.TrainableView` of a
      stored tensor (what refiners that train quantized weights use); optional
    """
    name: ClassVar[str]
    exporters: ClassVar[tuple[str, ...]] = ("compressed-tensors",)

    @attrs.define(frozen=True)
    class Options:
        pass

    def __init__(self, options=None):
        self.options = options if options is not None else self.Options()

    def check(self, spec: LayerSpec, shape: tuple[int, int]) -> None:
        raise NotImplementedError

    def bits_per_weight(self, spec: LayerSpec, shape: tuple[int, int]) -> float:
        raise NotImplementedError

    def stored_bits_per_weight(self, spec: LayerSpec, shape: tuple[int, int], qt) -> float:
        return self.bits_per_weight(spec, shape)

    def structure(self, qt) -> dict[str, int | float | str]:
        return {}

    def settle(self, specs: list[LayerSpec], shapes: dict[str, tuple[int, int]]) -> None:
        pass

    def to_tensors(self, prefix: str, qt, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def from_tensors(self, prefix: str, tensors: dict[str, torch.Tensor], meta: dict):
        raise NotImplementedError

    def module(self, qt, bias: torch.Tensor | None) -> torch.nn.Module:
        raise NotImplementedError

    def checkpoint_config(self, entries: dict[str, dict]) -> dict | None:
        return None

    def trainable(self, qt, spec: LayerSpec):
        raise OnecompError(f"format {self.name!r} has no trainable view: implement {type(self).__name__}.trainable"
                           f"(qt, spec) (docs/formats.md) to use refiners that train quantized weights")

    @staticmethod
    def fail(msg: str):
        raise OnecompError(msg)
