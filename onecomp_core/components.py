"""Base classes of the component kinds that plugins register (formats and model adapters live in
their own modules). Each has a ``name`` and a nested frozen attrs ``Options`` class.

A run is an ordered list of stages over one model: preprocess -> plan -> layer-wise pass (the
pivot) -> refiners -> export -> evaluate. The kinds below are what those stages call; the
contexts they receive are in :mod:`onecomp_core.contexts`.
"""
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


# --- plan ---------------------------------------------------------------------------------------
class Planner(Component):
    """A :class:`~onecomp_core.contexts.PlanContext` -> a :class:`Plan` of per-module specs."""

    def plan(self, ctx) -> Plan:
        raise NotImplementedError


# --- preprocess ---------------------------------------------------------------------------------
class Transform:
    """A fitted function-preserving transform, applied to the model as it streams by: each
    decoder block right after it is loaded (``apply_block``) and the outer modules once
    (``apply_outer``). Must be deterministic: a resumed run applies it again to the blocks it
    has not finished."""

    def apply_block(self, index: int, block: torch.nn.Module) -> None:
        """Rewrite block ``index`` in place (its weights are full precision, compute dtype)."""

    def apply_final(self, norm: torch.nn.Module | None, head: torch.nn.Module | None) -> None:
        """Rewrite the final norm and the output head in place, before ``apply_outer`` (e.g. fold
        the norm's weight into the head). ``norm`` is None when the adapter names none; a head
        tied to the embedding may be the same parameter: replace ``head.weight`` to untie it."""

    def apply_outer(self, embeddings: torch.nn.Module, head: torch.nn.Module | None) -> None:
        """Rewrite the input embedding and the output head in place (``head`` is None when the
        model has none; when the config ties them, keep them equal or untie them through
        ``checkpoint_config``)."""

    def checkpoint_config(self) -> dict:
        """Keys merged into the output's ``config.json`` (e.g. what a loader must apply online)."""
        return {}

    def describe(self) -> dict:
        """What the run report records about this transform."""
        return {}


class Preprocessor(Component):
    """A function-preserving transform of the whole model before quantization: ``fit`` once
    (it may run the FP model on the calibration stream), then the returned :class:`Transform`
    is applied block by block."""

    def fit(self, ctx) -> Transform:
        raise NotImplementedError


# --- layer-wise pass ----------------------------------------------------------------------------
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


# --- refiners, by scope -------------------------------------------------------------------------
class Refiner(Component):
    """Improves the quantized model. Subclass one (or several) of the scopes below; the config
    names refiners in one ordered list (``refiners``) and the scheduler calls each at its scope,
    in that order."""

    needs_trainable: ClassVar[bool] = False     # True: trains quantized weights through Format.trainable

    def check(self, spec: LayerSpec, fmt) -> None:
        """Called for every module of the plan before any block is quantized: raise
        :class:`OnecompError` with what to change when this refiner cannot work on ``spec`` in
        ``fmt``. The default refuses, for a refiner with ``needs_trainable``, a format without a
        trainable view."""
        from .formats.base import Format
        if self.needs_trainable and type(fmt).trainable is Format.trainable:
            raise OnecompError(f"refiner {self.name!r} trains quantized weights and format {fmt.name!r} "
                               f"({spec.name}) has no trainable view: implement {type(fmt).__name__}.trainable "
                               f"(docs/formats.md) or drop --refiner {self.name}")

    def estimate(self, ctx) -> dict | None:
        """Under ``--refine auto``, before this refiner runs: ``{"memory_bytes": predicted peak
        of the process (model refiners) or extra bytes over the layer-wise pass (block
        refiners), "seconds": predicted time or None}``; None when unknown (it then runs).
        ``ctx``: an :class:`~onecomp_core.contexts.EstimateContext` for block refiners, the
        :class:`~onecomp_core.contexts.ModelContext` it would get for model refiners."""
        return None

    def active_scopes(self) -> tuple[str, ...]:
        """The scopes this instance acts at with its options: its class's scopes by default; a
        class of several scopes may drop one an option turns off (blockptq's model-scope window
        pass runs only with ``windows=true``)."""
        return type(self).scopes()

    @classmethod
    def scopes(cls) -> tuple[str, ...]:
        return tuple(s for s, base in (("layer", Correction), ("block", BlockRefiner), ("model", ModelRefiner))
                     if issubclass(cls, base))


class Correction(Refiner):
    """Layer scope: changes what a projector aims at while one linear is quantized (QEP, LPCD's
    closed-form step) or post-processes its result. ``statistics`` names what it reads from
    ``ctx.stats`` (see :data:`onecomp_core.gather.STATISTICS`); the pass gathers only what some
    component asked for."""
    statistics: frozenset = frozenset({"gram"})

    def adjust_target(self, ctx) -> torch.Tensor:
        """-> the weight the projector should aim at (start from ``ctx.target``)."""
        return ctx.target

    def after_projection(self, ctx, qt):
        """-> the quantized tensor to keep (same format), e.g. an improved ``qt``."""
        return qt


class BlockRefiner(Refiner):
    """Block scope: acts on one decoder block inside the layer-wise pass, through a
    :class:`~onecomp_core.contexts.BlockContext` (which can restore FP weights, re-quantize a
    group, snapshot and roll back, and measure the block's output error)."""
    needs_fp_weights: ClassVar[bool] = False     # True: keep a copy of the block's FP linears
    # True: ``refine_block`` is correct on this rank's shard of the samples in a data-parallel run
    # (it judges with ``bctx.error``, which reduces over ranks, averages gradients with
    # ``bctx.sync_gradients`` and runs ``bctx.max_over_ranks(steps)`` steps); False: such a run refuses it
    data_parallel: ClassVar[bool] = False
    # True: all its work is in ``refine_block`` on the tensors it is given, so it can also refine
    # the blocks of a finished checkpoint (``onecomp refine DIR``: the stored tensors stand in for
    # the projection); False: it acts while the pass quantizes (e.g. ``before_group``)
    on_checkpoint: ClassVar[bool] = False

    def before_group(self, bctx, group: list[str]) -> None:
        """Before the first quantization of ``group`` (relative names) in this block."""

    def refine_block(self, bctx) -> None:
        """After every linear of the block is quantized, before the block is committed."""


class ModelRefiner(Refiner):
    """Model scope: runs on the finished pivot checkpoint through a
    :class:`~onecomp_core.contexts.ModelContext`; returns new quantized tensors (same format and
    spec) for the modules it changed, or None. The scheduler keeps the result only if the
    held-out calibration metric does not get worse."""
    # True: ``refine`` is correct on every rank of a data-parallel run at once: it trains on
    # ``mctx.shard_ids()``, averages gradients with ``mctx.sync_gradients``, runs
    # ``mctx.max_over_ranks(steps)`` steps and writes resume state only where ``mctx.leader``, so
    # every rank ends with the same tensors. False: a data-parallel run gives it to rank 0 alone
    data_parallel: ClassVar[bool] = False

    def refine(self, mctx) -> dict | None:
        raise NotImplementedError


# --- export -------------------------------------------------------------------------------------
class Exporter(Component):
    """Writes the whole checkpoint (or an extra artefact beside it) from the committed blocks."""
    suffix: ClassVar[str] = ""        # what it adds to the output folder, for messages

    def check(self, spec: LayerSpec, fmt) -> None:
        """Before quantization starts, for every planned module: raise :class:`OnecompError` when
        this exporter cannot carry ``fmt`` (default: the format lists it in ``exporters``)."""
        if self.name not in getattr(fmt, "exporters", ()):
            carried = ", ".join(getattr(fmt, "exporters", ())) or "none"
            raise OnecompError(f"exporter {self.name!r} cannot carry format {fmt.name!r} ({spec.name}); "
                               f"exporters of {fmt.name!r}: {carried}. Drop --export {self.name} or pick a format it carries")

    def check_model(self, config: dict, source_folder, shapes: dict) -> None:
        """Before quantization starts, once: raise :class:`OnecompError` when this exporter cannot
        write this model (its ``config.json`` content, source folder with the tokenizer files,
        quantizable linears' (out, in) shapes). Default: nothing to check."""

    def export(self, ectx) -> list[str]:
        """Write into ``ectx.folder``; -> the files written (relative names)."""
        raise NotImplementedError
