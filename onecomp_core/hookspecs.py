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
    modules and a budget into a :class:`~onecomp_core.plan.Plan`."""


@hookspec
def onecomp_register_preprocessors(registry):
    """Add preprocessor classes (function-preserving transforms run before quantization)."""


@hookspec
def onecomp_register_projectors(registry):
    """Add projector classes: (W, statistics, spec) -> quantized tensor."""


@hookspec
def onecomp_register_refiners(registry):
    """Add refiner classes. ``scope = "layer"`` refiners (corrections) act inside the
    layer-wise pass, before and after each projection; other scopes act on the pivot."""


@hookspec
def onecomp_register_formats(registry):
    """Add format classes: quantized representation, packing, inference module, save/load."""


@hookspec
def onecomp_register_model_adapters(registry):
    """Add model adapter classes that know an architecture's blocks and linear modules."""


# --- observation hooks ----------------------------------------------------------------------
@hookspec
def onecomp_stage_start(stage: str, info: dict):
    """A stage begins (``calibration``, ``layerwise``, ``export``, ``evaluate``...).
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
