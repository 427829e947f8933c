"""Replaying a settled submodule's output in the layer-wise pass.

A block is run on the calibration stream several times while its groups are quantized in
execution order (statistics of q/k/v, then o, then gate/up, then down, then the block's output).
Once every linear of a submodule such as the attention is final, its input (the stream entering
the block, through a norm) and its weights no longer change, so its output is the same in every
later forward: :class:`Replay` records it in the first complete round of forwards and returns the
recorded values, batch by batch, in the rounds after (the attention is then computed twice per
block instead of four times).
"""
from __future__ import annotations

import contextlib

import torch


class Replay:
    """Stands in for ``module.forward``: records one complete round of its outputs (one per
    batch, in order), then returns them in each later round. A round cut short (a forward
    stopped early inside the module) records nothing."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.outputs: list = []
        self.recorded = False
        self.pos = 0
        self._own = module.__dict__.get("forward")   # a forward already set on the instance (e.g. by accelerate)
        self._inner = self._own or type(module).forward.__get__(module)
        module.forward = self._call                  # an instance attribute wins over the class's forward

    def _call(self, *args, **kwargs):
        if self.recorded:
            out = self.outputs[self.pos]
        else:
            out = self._inner(*args, **kwargs)
            self.outputs.append(out)
        self.pos += 1
        return out

    def start_round(self) -> None:
        if not self.recorded:
            self.outputs = []
        self.pos = 0

    def end_round(self, batches: int) -> None:
        self.recorded = self.recorded or len(self.outputs) == batches   # a partial record is dropped next round

    def remove(self) -> None:
        if self._own is not None:
            self.module.forward = self._own
        else:
            self.module.__dict__.pop("forward", None)
        self.outputs = []


class Replays:
    """The replays of one block: ``with replays.round(batches):`` around each round of forwards."""

    def __init__(self):
        self.items: dict[int, Replay] = {}

    def add(self, module: torch.nn.Module) -> None:
        if id(module) not in self.items:
            self.items[id(module)] = Replay(module)

    @contextlib.contextmanager
    def round(self, batches: int):
        for r in self.items.values():
            r.start_round()
        yield
        for r in self.items.values():
            r.end_round(batches)

    def remove(self) -> None:
        for r in self.items.values():
            r.remove()
        self.items = {}
