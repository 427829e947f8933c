"""pluggy hook specifications of onecomp (project name ``onecomp``).

Registration hooks let a plugin add named components to the :class:`Registry`; the config names
them and the scheduler calls them. Observation hooks see the run as it happens (progress bars,
logging, timing); they must not change numerics.
"""
from __future__ import annotations

import pluggy

PROJECT = "onecomp"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --- registration hooks: one per component kind -------------------------------------------
@hookspec
def onecomp_register_planners(registry):
    """Add planner classes: ``registry.add_planner(cls)``. A planner turns the model's linear
    modules and a budget into a :class:`~onecomp_core.spec.Plan`."""


@hookspec
def onecomp_register_preprocessors(registry):
    """Add preprocessor classes: function-preserving transforms fitted once before quantization
    and applied to each block as it is loaded (``fit(ctx) -> Transform``)."""


@hookspec
def onecomp_register_projectors(registry):
    """Add projector classes: (W, statistics, spec) -> quantized tensor."""


@hookspec
def onecomp_register_refiners(registry):
    """Add refiner classes, each a subclass of one or more scopes: ``Correction`` (layer: the
    target of each projection and its result), ``BlockRefiner`` (block: before each group and
    after the block's linears are quantized, before commit), ``ModelRefiner`` (the pivot)."""


@hookspec
def onecomp_register_formats(registry):
    """Add format classes: quantized representation, packing, inference module, save/load."""


@hookspec
def onecomp_register_model_adapters(registry):
    """Add model adapter classes that know an architecture's blocks and linear modules."""


@hookspec
def onecomp_register_exporters(registry):
    """Add exporter classes: write the checkpoint (or an artefact beside it) from the committed
    blocks. ``compressed-tensors`` (the core's) is the main one; ``--export NAME`` adds others."""


# --- observation hooks ----------------------------------------------------------------------
@hookspec
def onecomp_stage_start(stage: str, info: dict):
    """A stage begins (``open_model``, ``calibration``, ``capture``, ``preprocess``, ``plan``,
    ``layerwise``, ``refine``, ``export``, ``evaluate``).
    ``info`` may hold ``total`` (work units) for progress displays."""


@hookspec
def onecomp_stage_finish(stage: str, info: dict):
    """A stage ends; ``info`` holds at least ``seconds``."""


@hookspec
def onecomp_block_start(index: int, total: int, layers: list):
    """The layer-wise pass starts block ``index`` of ``total``; ``layers`` are its linears."""


@hookspec
def onecomp_layer_done(block: int, name: str, info: dict):
    """One linear module is quantized; ``info`` holds its error and spec."""


@hookspec
def onecomp_block_done(index: int, total: int, info: dict):
    """Block ``index`` is quantized and committed to disk."""


@hookspec
def onecomp_run_finish(report: dict):
    """The run is complete; ``report`` is the run report written beside the checkpoint."""
