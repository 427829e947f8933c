"""Base classes of the component kinds that plugins register (formats and adapters live in
their own modules). Each has a ``name`` and a nested attrs ``Options`` class."""
from __future__ import annotations

from typing import ClassVar

import attrs
import torch

from .errors import OnecompError
from .spec import LayerSpec, Plan


class Component:
    name: ClassVar[str]

    @attrs.define(frozen=True)
    class Options:
        pass

    def __init__(self, options=None):
        self.options = options if options is not None else self.Options()


class Projector(Component):
    """(W, statistics, spec) -> a quantized tensor of ``spec.format``.

    ``W`` is the float32 target (out x in); ``H`` the input Gram matrix X X^T / N (in x in,
    float32) of the layer's calibration inputs, or None when ``needs_hessian`` is False."""
    needs_hessian: ClassVar[bool] = True
    writes: ClassVar[tuple[type, ...]] = ()     # the format classes it can write (subclasses too); () = any

    def check(self, spec: LayerSpec, fmt) -> None:
        """Called for every module of the plan after planning, before any block is quantized
        (and again by ``project``): raise :class:`OnecompError` with what to change when this
        projector cannot write ``spec`` in ``fmt``. The default checks ``writes``."""
        if self.writes and not isinstance(fmt, self.writes):
            names = " or ".join(repr(c.name) for c in self.writes)
            raise OnecompError(f"projector {self.name!r} writes format {names}, not {spec.format!r}: pass "
                               f"--format {self.writes[0].name} or pick a projector for {spec.format!r}")

    def project(self, W: torch.Tensor, H: torch.Tensor | None, spec: LayerSpec, fmt):
        raise NotImplementedError


@attrs.define
class LayerContext:
    """What a layer-scope refiner sees while one linear is quantized."""
    name: str
    spec: LayerSpec
    weight: torch.Tensor            # the layer's full-precision weight (float32)
    target: torch.Tensor            # what the projector will aim at (starts as ``weight``)
    H: torch.Tensor | None          # input Gram of the quantized stream
    stats: dict                     # extra per-layer statistics a refiner asked for
    module: torch.nn.Module         # the live linear inside the block
    block: torch.nn.Module
    fmt: object


@attrs.define
class GroupContext:
    """What a layer-scope refiner sees before a group of linears is quantized."""
    block: torch.nn.Module
    prefix: str
    group: list                     # relative names of the linears about to be quantized
    quantized: set                  # relative names already quantized in this block
    q_inputs: torch.Tensor          # quantized stream entering the block (N, L, d)
    fp_outputs: torch.Tensor        # FP block's output on the FP stream: the block's target
    kwargs: dict
    pass_index: int = 0             # 0: first visit; > 0: a later pass (every other linear quantized,
                                    # this group's FP weights restored)
    residual_writers: frozenset = frozenset()   # linears of the block that write into the residual stream


class Refiner(Component):
    """Improves a quantized model. ``scope = "layer"`` refiners (corrections) run inside the
    layer-wise pass: ``adjust_target`` before a linear is projected and ``after_projection``
    after; the others run on the finished pivot checkpoint (``refine``)."""
    scope: ClassVar[str] = "layer"
    wants_fp_inputs: ClassVar[bool] = False   # True: observe() gets paired FP / quantized inputs

    @property
    def block_passes(self) -> int:
        """How many times the layer-wise pass visits each block's groups (coordinate descent:
        in later passes every group is re-relaxed from its FP weights with all the others
        quantized, then projected again). The pass makes max over the corrections."""
        return 1

    def begin_group(self, names: list[str]) -> None:
        """A group of linears (full names) sharing one input is about to be observed."""

    def observe(self, name: str, x_fp: torch.Tensor, x_q: torch.Tensor) -> None:
        """One calibration sample's input to linear ``name``: from the FP model on the FP stream
        and from the partly quantized model on the quantized stream (same tokens)."""

    def observe_residual(self, name: str, r_fp: torch.Tensor, r_q: torch.Tensor) -> None:
        """For a linear that writes into the residual stream (its output is added to it
        unnormalised, as the adapter's ``residual_taps`` declares): the residual stream at that
        add in the FP and the quantized model, for the same sample."""

    def prepare_group(self, gctx: "GroupContext") -> None:
        """Before a group's statistics are collected and its linears projected (block-wise
        compensation adjusts the block's still-FP linears here)."""

    def adjust_target(self, ctx: LayerContext) -> torch.Tensor:
        return ctx.target

    def after_projection(self, ctx: LayerContext, qt):
        return qt

    def refine(self, model, data):
        raise NotImplementedError(f"refiner {self.name!r} has no pivot stage")


@attrs.define
class PlanContext:
    """What a planner may use. ``weight`` and the statistics are computed on demand."""
    shapes: dict                      # module name -> (out, in), execution order
    groups: list                      # lists of module names sharing one input (q/k/v, gate/up, ...)
    run: object                       # the RunConfig
    formats: dict                     # format name -> format object
    registry: object
    checkpoint_dtype: torch.dtype
    weight: object                    # name -> float32 FP weight (read lazily from the checkpoint)
    input_diag: object                # () -> {name: diag(X X^T) / N}, one FP pass over the blocks
    input_grams: object = None        # (fn) -> {name: fn(H)}, H = X X^T / N, one FP pass, one block's Grams held
    model_folder: object = None
    calibration_ids: object = None    # (N, L) token ids
    device: object = None
    make: object = None               # (kind, name) -> that component, built with the run's options


class Planner(Component):
    """A :class:`PlanContext` -> a :class:`Plan` of per-module specs."""

    def plan(self, ctx: PlanContext) -> Plan:
        raise NotImplementedError


class Preprocessor(Component):
    """A function-preserving transform of the whole model before quantization."""

    def apply(self, model):
        raise NotImplementedError
