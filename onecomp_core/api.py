"""The one-line API: ``quantize(model, bits=4, ...)`` and ``load_quantized(folder)``."""
from __future__ import annotations

from pathlib import Path

from .checkpoint import load_quantized
from .config import make_config
from .errors import OnecompError
from .plugins import load_plugins
from .resolve import Resolved
from .runner import Runner

__all__ = ["quantize", "load_quantized", "make_config", "Resolved", "Runner"]


def quantize(model=None, out=None, *, config=None, plugins=(), options=None, dry_run: bool = False, **fields) -> dict:
    """Quantize ``model`` (folder, .gguf file or hub id) into ``out``; returns the run report.
    ``dry_run=True`` stops after the plan and the refiners' choice, writes nothing in or beside
    ``out`` and returns what the run would do (``onecomp_core.dry_run``).

    Keyword fields are those of :class:`~onecomp_core.config.RunConfig` (bits, group_size,
    symmetric, projector, preprocessors, refiners, planner, format, exports, device, ...), the
    budget's (target_bpw, budget_bytes, fit_memory, context, batch) and the calibration's
    (calibration=FILE, num_samples, seq_len, strategy, seed, batch_size); ``options`` maps
    component names to option tables; ``plugins`` are extra plugin objects registered in code."""
    run = make_config(model, config, options=options, out=str(out) if out is not None else None, **fields)
    if not run.out:
        raise OnecompError("no output folder: pass out=DIR (--out DIR)")
    return Runner(Resolved(run, load_plugins(extra=list(plugins))), dry_run=dry_run).run()


def refine(folder, *, refiners=(), options=None, plugins=(), dry_run: bool = False, **fields) -> dict:
    """Run refiners (``refiners``, in order) on the onecomp checkpoint ``folder`` (a pivot or an
    already refined one), as the quantize run that made it would have: same source model,
    calibration and plan. Model refiners train the whole checkpoint; a block refiner that can
    (``on_checkpoint``, e.g. blockptq's Phase 1) runs over its blocks again, the stored tensors
    standing in for the projection. ``folder`` is replaced, atomically, by the result, which keeps
    each step's tensors only where the held-out KL fell; the report's ``refine`` list grows.
    ``refine="auto"`` adds the installed refiners of ``AUTO_REFINERS`` that fit ``max_memory``
    and ``time_budget`` (as ``quantize`` does; those that cannot run on this checkpoint are
    skipped with a line saying why). ``fields``: ``eval_text``, ``refine_samples``, ``heldout``,
    ``device``, ``dtype``, ``refine``, ``max_memory``, ``time_budget``. ``dry_run=True``: each step's
    estimate and the choice, nothing trained, judged or written (``onecomp_core.dry_run``)."""
    from .checkpoint import read_meta
    folder = Path(folder)
    if not folder.is_dir():
        raise OnecompError(f"checkpoint folder {folder} does not exist")
    meta = read_meta(folder)
    base = {k: v for k, v in meta.get("config", {}).items() if k != "resolved_options"}
    # the run that made the checkpoint chose its own refiners and budgets; this one chooses afresh
    base.update(model=meta.get("source_model", base.get("model")), out=str(folder), overwrite=False,
                refiners=list(refiners), eval_text=None, refine="manual", max_memory=None, time_budget=None)
    run = make_config(config=base, options=options, **fields)
    res = Resolved(run, load_plugins(extra=list(plugins)))
    if run.refine != "auto" and not res.refiners:
        raise OnecompError("name at least one refiner to run: --refiner NAME (e.g. blockptq, globalptq), "
                           "or --refine auto")
    for r in list(res.refiners):
        try:
            _check_refinable(r, meta, folder)
        except OnecompError as e:
            if r.name not in res.auto_refiners:
                raise
            res.drop_auto(r.name, str(e))     # added by --refine auto: skipped, saying why
    if not res.refiners:
        raise OnecompError(f"--refine auto found no refiner that can act on {folder} (see the lines above); "
                           f"install onecomp-plugin-globalptq (or -blockptq), or name a refiner with --refiner")
    return Runner(res, refine_only=True, dry_run=dry_run).run()


def _check_refinable(r, meta: dict, folder: Path) -> None:
    """Whether refiner ``r`` can act on the finished checkpoint ``folder`` (its metadata
    ``meta``): a block refiner that works on stored tensors, or a model refiner."""
    from .checkpoint_blocks import check_on_checkpoint
    scopes = r.active_scopes()
    if "block" in scopes:
        check_on_checkpoint(r, meta)
    elif "model" not in scopes:
        turn_on = (" (its model-scope pass is off with these options)" if "model" in type(r).scopes() else "")
        raise OnecompError(f"refiner {r.name!r} works inside the layer-wise pass, not on a finished checkpoint"
                           f"{turn_on}: quantize again with --refiner {r.name}, or refine {folder} with a model "
                           f"or block refiner")
