"""The public plugin API: everything a plugin may import from the core, and nothing else.

A plugin imports from here (and the one-line API, ``onecomp_core.quantize`` /
``load_quantized``); the core's other modules are internal and may change. Tests of a plugin
may also use :mod:`onecomp_core.testing`.

    from onecomp_core.sdk import Correction, hookimpl, in_range
"""
from __future__ import annotations

from .adapters import ModelAdapter, ResidualLayout, find_adapter
from .block_pass import BlockContext
from .checkpoint import quantized_tensors
from .components import (BlockRefiner, Component, Correction, Exporter, ModelRefiner, Planner, Preprocessor,
                         Projector, Refiner, Transform)
from .contexts import EstimateContext, ExportContext, LayerContext, ModelContext, PlanContext, PreprocessContext
from .errors import OnecompError, UnknownNameError
from .formats import grid
from .formats.base import Format
from .formats.trainable import (TrainableLinear, TrainableView, attach_views, smooth_round, smooth_sign, ste,
                                stored_float)
from .formats.uniform import QuantLinear, UniformFormat, UniformTensor
from .gather import STATISTICS
from .hashing import file_digest, tensor_digest, weights_digest
from .hessian import damp_hessian, inverse_cholesky_upper
from .hookspecs import hookimpl
from .model_source import cache_root
from .planners import excluded, scale_dtype_for
from .plugins import load_plugins
from .evaluate import quiet_loading
from .progress import bar
from .report import rss_bytes
from .projectors import GridOptions
from .resources import human_bytes, human_seconds, parse_duration, parse_size, release_memory
from .schedules import geometric, go_round, warmup_cosine
from .spec import LayerSpec, Plan
from .store import atomic_json, atomic_torch_save
from .stats import Cross, Diag, Gram, OuterSum, Residual, Statistic
from .streams import block_error, cast_floats, run_block
from .validators import boolean, in_range, one_of, positive

__all__ = [
    # hooks and component kinds
    "hookimpl", "Component", "Planner", "Preprocessor", "Transform", "Projector", "Refiner", "Correction",
    "BlockRefiner", "ModelRefiner", "Exporter", "Format", "ModelAdapter", "ResidualLayout",
    # what the stages hand them
    "PlanContext", "PreprocessContext", "LayerContext", "BlockContext", "ModelContext", "ExportContext",
    "EstimateContext",
    "LayerSpec", "Plan", "STATISTICS",
    # errors and option validators
    "OnecompError", "UnknownNameError", "in_range", "positive", "one_of", "boolean",
    # the uniform format and its grid math, shared by grid projectors
    "grid", "UniformFormat", "UniformTensor", "QuantLinear", "GridOptions",
    # trainable views of stored tensors and their estimators
    "TrainableView", "TrainableLinear", "attach_views", "ste", "stored_float", "smooth_round", "smooth_sign",
    # what refiners that train share: schedules, a progress bar
    "warmup_cosine", "geometric", "go_round", "bar",
    # helpers
    "find_adapter", "excluded", "scale_dtype_for", "damp_hessian", "inverse_cholesky_upper", "cache_root", "block_error",
    "run_block", "load_plugins", "quantized_tensors", "parse_size", "parse_duration", "cast_floats", "rss_bytes",
    "quiet_loading", "release_memory",
    # sizes and durations in messages, as the core writes them (binary units, labelled)
    "human_bytes", "human_seconds",
    # a resume state written whole or not at all
    "atomic_json", "atomic_torch_save",
    # content digests for the keys of a plugin's on-disk caches
    "file_digest", "tensor_digest", "weights_digest",
    # mergeable statistics
    "Statistic", "OuterSum", "Gram", "Cross", "Residual", "Diag",
]
