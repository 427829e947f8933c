"""The core's own plugin: RTN, the uniform format, the uniform planner, the decoder adapter, the
``compressed-tensors`` exporter and progress bars (an observation-hook plugin like any other)."""
from __future__ import annotations

from .adapters.decoder import DecoderAdapter
from .export import CompressedTensorsExporter
from .formats.uniform import UniformFormat
from .hookspecs import hookimpl
from .planners import UniformPlanner
from .progress import Progress
from .projectors import RTN


@hookimpl
def onecomp_register_projectors(registry):
    registry.add_projector(RTN)


@hookimpl
def onecomp_register_formats(registry):
    registry.add_format(UniformFormat)


@hookimpl
def onecomp_register_planners(registry):
    registry.add_planner(UniformPlanner)


@hookimpl
def onecomp_register_model_adapters(registry):
    registry.add_model_adapter(DecoderAdapter)


@hookimpl
def onecomp_register_exporters(registry):
    registry.add_exporter(CompressedTensorsExporter)


progress = Progress()


@hookimpl
def onecomp_stage_start(stage, info):
    progress.stage_start(stage, info)


@hookimpl
def onecomp_stage_finish(stage, info):
    progress.stage_finish(stage, info)


@hookimpl
def onecomp_block_start(index, total, layers):
    progress.block_start(index, total, layers)


@hookimpl
def onecomp_layer_done(block, name, info):
    progress.layer_done(block, name, info)


@hookimpl
def onecomp_block_done(index, total, info):
    progress.block_done(index, total, info)
