"""The one-line API: ``quantize(model, bits=4, ...)`` and ``load_quantized(folder)``."""
from __future__ import annotations

from .checkpoint import load_quantized
from .config import make_config
from .errors import OnecompError
from .plugins import load_plugins
from .resolve import Resolved
from .runner import Runner

__all__ = ["quantize", "load_quantized", "make_config", "Resolved", "Runner"]


def quantize(model=None, out=None, *, config=None, plugins=(), options=None, **fields) -> dict:
    """Quantize ``model`` (folder, .gguf file or hub id) into ``out``; returns the run report.

    Keyword fields are those of :class:`~onecomp_core.config.RunConfig` (bits, group_size,
    symmetric, projector, preprocessors, refiners, planner, format, exports, device, ...), the
    budget's (target_bpw, budget_bytes, fit_memory, context, batch) and the calibration's
    (calibration=FILE, num_samples, seq_len, strategy, seed, batch_size); ``options`` maps
    component names to option tables; ``plugins`` are extra plugin objects registered in code."""
    run = make_config(model, config, options=options, out=str(out) if out is not None else None, **fields)
    if not run.out:
        raise OnecompError("no output folder: pass out=DIR (--out DIR)")
    return Runner(Resolved(run, load_plugins(extra=list(plugins)))).run()
