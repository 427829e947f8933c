"""Replaying a settled submodule's output in the layer-wise pass.

A block is run on the calibration stream several times while its groups are quantized in
execution order (statistics of q/k/v, then o, then gate/up, then down, then the block's output).
Once every linear of a submodule such as the attention is final, its input (the stream entering
the block, through a norm) and its weights no longer change, so its output is the same in every
later forward: :class:`Replay` records it in the first complete round of forwards and returns the
recorded values, batch by batch, in the rounds after.

One round earlier already, while only the attention's output projection (o_proj) is left: its
input (the attention core over final q/k/v) cannot change any more, and the round that gathers
o_proj's statistics sees it. :class:`ProjectionReplay` records that input, and once o_proj is
quantized the attention's output is o_proj applied to the record: the attention core (q/k/v,
rotary, the attention kernel) then runs once per block instead of four times.
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


class ProjectionReplay(Replay):
    """Stands in for ``module.forward`` where ``module``'s first output is exactly its output
    projection ``proj`` applied to an input that is final before ``proj`` is (the attention).
    Records one complete round of ``proj``'s inputs (a forward pre-hook, placed before any
    other, so a forward stopped at ``proj`` still records); afterwards each call returns
    ``proj(recorded input)`` in the place of the first output. The first such call also runs the
    real forward once and checks the two agree exactly (and that the other outputs are not
    tensors, which could differ per batch); where they do not, it calls the real forward from
    then on."""

    def __init__(self, module: torch.nn.Module, proj: torch.nn.Module):
        super().__init__(module)
        self.proj = proj
        self.agrees: bool | None = None  # None until the first use has compared with the real forward
        self.rest = None                 # the outputs after the first (None: the module returns one tensor)
        self._handle = proj.register_forward_pre_hook(self._record, prepend=True)

    def _record(self, mod, args):
        if not self.recorded:
            self.outputs.append(args[0])

    def _call(self, *args, **kwargs):
        if not self.recorded or self.agrees is False:
            return self._inner(*args, **kwargs)
        x = self.outputs[self.pos]
        self.pos += 1
        if self.agrees is None:          # first use: the real forward once, to compare with
            real = self._inner(*args, **kwargs)
            first, self.rest = (real, None) if torch.is_tensor(real) else (real[0], tuple(real[1:]))
            self.agrees = torch.equal(first, self.proj(x)) and not any(torch.is_tensor(r) for r in self.rest or ())
            return real
        y = self.proj(x)
        return y if self.rest is None else (y, *self.rest)

    def end_round(self, batches: int) -> None:
        if not self.recorded:
            super().end_round(batches)

    def remove(self) -> None:
        self._handle.remove()
        super().remove()


class Replays:
    """The replays of one block: ``with replays.round(batches):`` around each round of forwards.
    A module may hold a :class:`ProjectionReplay` and later a :class:`Replay` on top of it; they
    are removed in the reverse order."""

    def __init__(self):
        self.items: dict[tuple, Replay] = {}

    def add(self, module: torch.nn.Module) -> None:
        if ("out", id(module)) not in self.items:
            self.items[("out", id(module))] = Replay(module)

    def add_projection(self, module: torch.nn.Module, proj: torch.nn.Module) -> None:
        if ("proj", id(module)) not in self.items and ("out", id(module)) not in self.items:
            self.items[("proj", id(module))] = ProjectionReplay(module, proj)

    @contextlib.contextmanager
    def round(self, batches: int):
        for r in self.items.values():
            r.start_round()
        yield
        for r in self.items.values():
            r.end_round(batches)
        for (kind, key), r in list(self.items.items()):     # an output record makes the input record redundant
            out = self.items.get(("out", key))
            if kind == "proj" and out is not None and out.recorded:
                r.outputs, r.agrees = [], False

    def remove(self) -> None:
        for r in reversed(list(self.items.values())):
            r.remove()
        self.items = {}
