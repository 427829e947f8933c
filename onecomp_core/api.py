"""The one-line API: ``quantize(model, bits=4, ...)`` and ``load_quantized(folder)``."""
from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from . import __version__
from .calibration import calibration_samples
from .checkpoint import assemble, load_quantized
from .config import RunConfig, build_options, from_dict, options_dict, read_file
from .errors import OnecompError
from .evaluate import evaluate, text_tokens
from .layerwise import LayerwisePass
from .registry import KINDS
from .model_source import resolve_model
from .plugins import load_plugins
from .report import markdown, peak_gpu_mb, peak_rss_mb
from .skeleton import Skeleton, pick_device
from .store import RunStore, atomic_json, atomic_write_bytes
from .components import PlanContext
from .stats import input_diagonals, input_statistics
from .streams import capture

__all__ = ["quantize", "load_quantized", "resolve_config", "Resolved"]


def make_config(model=None, config=None, **fields) -> RunConfig:
    """A validated RunConfig from a config file or table plus keyword overrides (None ignored)."""
    base = read_file(config) if isinstance(config, (str, Path)) else dict(config or {})
    if model is not None:
        base["model"] = str(model)
    cal = base.get("calibration", {})
    cal = {"source": cal} if isinstance(cal, str) else dict(cal)
    for k in ("num_samples", "seq_len", "strategy", "seed", "calibration_source"):
        v = fields.pop(k, None)
        if v is not None:
            cal["source" if k == "calibration_source" else k] = v
    if "calibration" in fields:
        v = fields.pop("calibration")
        if v is not None:
            cal["source"] = str(v)
    if cal:
        base["calibration"] = cal
    base.update({k: v for k, v in fields.items() if v is not None})
    return from_dict(base)


class Resolved:
    """A config with its components looked up by name and their options validated."""

    def __init__(self, run: RunConfig, plugins=None):
        self.run = run
        self.plugins = plugins or load_plugins()
        reg = self.plugins.registry
        opts = run.options
        self.formats = {}
        self.planner = self._make("planner", run.planner, reg)
        self.projectors = {run.projector: self._make("projector", run.projector, reg)}
        self.formats[run.format] = self._make("format", run.format, reg)
        self.corrections = []
        for name in run.corrections:
            cls = reg.get("refiner", name)
            if getattr(cls, "scope", "layer") != "layer":
                raise OnecompError(f"refiner {name!r} works on the finished checkpoint (scope {cls.scope!r}), "
                                   f"not as a layer-wise correction")
            self.corrections.append(self._make("refiner", name, reg))
        known = set(reg.names("planner")) | set(reg.names("projector")) | set(reg.names("format")) | \
            set(reg.names("refiner"))
        stray = sorted(set(opts) - known)
        if stray:
            raise OnecompError(f"options given for unknown component(s) {', '.join(map(repr, stray))}; "
                               f"known: {', '.join(sorted(known))}")

    def _make(self, kind, name, reg):
        cls = reg.get(kind, name)
        siblings = tuple(reg.get(k, name) for k in KINDS if k != kind and name in reg.names(k))
        return cls(build_options(kind, name, cls, self.run.component_options(name), siblings))

    def describe(self) -> dict:
        d = self.run.to_dict()
        comps = {"planner": self.planner, **{f"projector:{k}": v for k, v in self.projectors.items()},
                 **{f"format:{k}": v for k, v in self.formats.items()},
                 **{f"correction:{c.name}": c for c in self.corrections}}
        d["resolved_options"] = {k: options_dict(v.options) for k, v in comps.items()}
        return d


def resolve_config(run: RunConfig, plugins=None) -> Resolved:
    return Resolved(run, plugins)


def _fingerprint(res: Resolved, folder: Path) -> str:
    files = sorted((p.name, p.stat().st_size) for p in folder.glob("*.safetensors"))
    d = res.describe()
    for k in ("out", "overwrite", "eval_text", "eval_tokens", "eval_seq_len", "device"):
        d.pop(k, None)
    return hashlib.sha1(json.dumps([d, files, __version__], sort_keys=True, default=str).encode()).hexdigest()


def quantize(model=None, out=None, *, config=None, plugins=(), **fields) -> dict:
    """Quantize ``model`` (folder, .gguf file or hub id) into ``out``; returns the run report.

    Keyword fields are those of :class:`~onecomp_core.config.RunConfig` (bits, group_size,
    symmetric, projector, corrections, planner, target_bpw, format, options, device, ...) plus
    calibration shortcuts (calibration=FILE, num_samples, seq_len, strategy, seed)."""
    run = make_config(model, config, out=str(out) if out is not None else None, **fields)
    if not run.out:
        raise OnecompError("no output folder: pass out=DIR (--out DIR)")
    ps = load_plugins(extra=list(plugins))
    res = Resolved(run, ps)
    return Runner(res).run()


def few_tokens_warning(tokens: int, widest_input: int, factor: int = 4) -> str | None:
    """Hessian-based projectors overfit when H = X X^T / N comes from too few tokens."""
    if tokens >= factor * widest_input:
        return None
    return (f"calibration has {tokens} tokens, fewer than {factor} x the widest layer input ({widest_input}); "
            f"Hessian-based methods (GPTQ, corrections) may overfit: raise --num-samples or the damping")


class Runner:
    def __init__(self, res: Resolved):
        self.res, self.run_cfg = res, res.run
        self.hook = res.plugins.hook
        self.stages: dict[str, float] = {}

    def stage(self, name, fn, **info):
        self.hook.onecomp_stage_start(stage=name, info=info)
        t0 = time.time()
        result = fn()
        self.stages[name] = time.time() - t0
        self.hook.onecomp_stage_finish(stage=name, info={"seconds": self.stages[name]})
        return result

    def run(self) -> dict:
        t_start = time.time()
        run, res = self.run_cfg, self.res
        folder = self.stage("open_model", lambda: resolve_model(run.model))
        device = pick_device(run.device)
        sk = Skeleton(folder, res.plugins.registry, device, run.dtype)
        shapes = sk.linear_shapes()
        store = RunStore(Path(run.out), _fingerprint(res, folder), run.overwrite)
        start = store.finished
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        # read the evaluation text now: a wrong path should stop the run before the long work
        eval_ids = text_tokens(tokenizer, run.eval_text, run.eval_tokens) if run.eval_text else None
        cal = run.calibration
        ids = self.stage("calibration", lambda: calibration_samples(
            cal.source, tokenizer, cal.num_samples, cal.seq_len, cal.strategy, cal.seed,
            cal.text_field, cal.split, cal.cache))
        inputs, kwargs = self.stage("capture", lambda: capture(sk, ids))
        stats_cache = {}

        def input_diag():
            if "diag" not in stats_cache:
                stats_cache["diag"] = input_diagonals(sk, inputs, kwargs)
            return stats_cache["diag"]

        groups = [[f"{sk.block_prefix(i)}.{n}" for n in g] for i, blk in enumerate(sk.blocks)
                  for g in sk.adapter.linear_groups(blk)]
        ctx = PlanContext(shapes=shapes, groups=groups, run=run, formats=res.formats, registry=res.plugins.registry,
                          checkpoint_dtype=sk.checkpoint_dtype, weight=lambda n: sk.weights.get(n + ".weight").float(),
                          input_diag=input_diag, input_grams=lambda fn: input_statistics(sk, inputs, kwargs, fn),
                          model_folder=folder, calibration_ids=ids, device=device,
                          make=lambda kind, name: res._make(kind, name, res.plugins.registry))
        plan = self.stage("plan", lambda: res.planner.plan(ctx))
        for spec in plan.specs.values():
            if spec.projector not in res.projectors:
                res.projectors[spec.projector] = res._make("projector", spec.projector, res.plugins.registry)
            if spec.format not in res.formats:
                res.formats[spec.format] = res._make("format", spec.format, res.plugins.registry)
            res.formats[spec.format].check(spec, shapes[spec.name])
            res.projectors[spec.projector].check(spec, res.formats[spec.format])
        needs_h = any(p.needs_hessian for p in res.projectors.values()) or bool(res.corrections)
        few = few_tokens_warning(int(ids.numel()), max(s[1] for s in shapes.values())) if needs_h else None
        if few:
            print(f"onecomp: warning: {few}", file=sys.stderr)
        if start < len(sk.blocks):
            if start > 0:
                streams = store.streams()
                fp, q = streams["fp"].to(device), streams["q"].to(device)
            else:
                fp, q = inputs, inputs.clone()
            del inputs
            lw = LayerwisePass(sk, plan, res.projectors, res.formats, res.corrections, store, self.hook, needs_h)
            timing = self.stage("layerwise", lambda: lw.run(fp, q, kwargs, start), total=len(sk.blocks))
        else:
            timing = {"block_seconds": []}
        final = self.stage("export", lambda: assemble(sk, store, plan, res.formats,
                                                      {"onecomp_version": __version__, "config": res.describe(),
                                                       "source_model": str(folder)}))
        for fname, data in plan.artifacts.items():
            atomic_write_bytes(final / fname, data)
        layers = store.layer_info()
        self.peak_quantize = peak_rss_mb()
        evaluation = None
        if eval_ids is not None:
            evaluation = self.stage("evaluate", lambda: self._evaluate(final, folder, eval_ids))
        report = self._report(plan, res, layers, timing, evaluation, start, time.time() - t_start, folder, shapes)
        atomic_json(final / "report.json", report)
        atomic_write_bytes(final / "report.md", markdown(report).encode())
        store.publish(final)
        report["out"] = str(store.out)
        self.hook.onecomp_run_finish(report=report)
        return report

    def _evaluate(self, final, folder, ids):
        from .evaluate import load_reference
        run = self.run_cfg
        qmodel = load_quantized(final, run.device, run.dtype, self.res.plugins)
        ref, _ = load_reference(str(folder), run.device, run.dtype)
        return evaluate(qmodel, ids, ref=ref, seq_len=run.eval_seq_len)

    def _report(self, plan, res, layers, timing, evaluation, start, wall, folder, shapes):
        total_bits = sum(layers[n]["bpw"] * shapes[n][0] * shapes[n][1] for n in plan.specs if n in layers)
        params = sum(shapes[n][0] * shapes[n][1] for n in plan.specs)
        run = self.run_cfg
        bs = timing["block_seconds"]
        summary = {"model": str(run.model), "source_folder": str(folder), "format": run.format,
                   "projector": run.projector, "corrections": list(run.corrections), "planner": run.planner,
                   "bits": run.bits, "group_size": run.group_size, "symmetric": run.symmetric,
                   "bpw": round(total_bits / max(params, 1), 4), "quantized_params": params,
                   "wall_seconds": round(wall, 2), "seconds_per_block": round(sum(bs) / len(bs), 3) if bs else None,
                   "peak_rss_mb": round(self.peak_quantize, 1), "peak_gpu_mb": peak_gpu_mb(),
                   "peak_rss_mb_with_eval": round(peak_rss_mb(), 1) if evaluation else None,
                   "resumed_from_block": start, "device": str(pick_device(run.device))}
        return {"summary": summary, "stages": self.stages, "layers": layers, "evaluation": evaluation,
                "config": res.describe(), "plan": {n: s.to_dict() for n, s in plan.specs.items()},
                "plan_info": plan.info}
