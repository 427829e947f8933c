"""The scheduler: one run as a short sequence of named stages over one model.

    open_model -> calibration -> capture -> preprocess -> plan -> layerwise (the pivot)
      -> refine (model refiners) -> export -> evaluate -> report and publish

Each stage is a method; ``stage`` times it and tells the observation hooks. Stages that have
nothing to do (no preprocessors, no model refiners, no evaluation text, every block already
committed) are skipped.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import attrs
import torch

from . import __version__
from .calibration import available_samples, bos_id, calibration_samples
from .checkpoint import load_quantized, read_meta, stored_modules
from .checkpoint_blocks import CheckpointBlocks
from .components import Transform
from .contexts import EstimateContext, ExportContext, PlanContext, PreprocessContext
from .errors import OnecompError
from .formats.trainable import attach_views
from .evaluate import evaluate, load_reference, text_tokens
from .hashing import weights_digest
from .lazy_weights import LazyWeights
from .gather import input_diagonals, input_statistics
from .block_pass import LayerwisePass, streams_used
from .model_source import resolve_model
from .refine_stage import RefineStore, heldout_reference, model_context, refine_work, run_model_refiners
from .fit import RefineChoice
from .reference_pass import measure_reference
from .resources import memory_budget, parse_size, release_memory, set_threads
from .report import peak_gpu_mb, peak_rss_mb, reset_stage_peak, rss_mb, stage_peak_mb, write_reports
from .planners import excluded, uniform_specs
from .resolve import Resolved
from .spec import LayerSpec, Plan
from .skeleton import Skeleton, forward_autocast, pick_device
from .distributed import rank_device, start_ranks
from .disk import check_disk, checkpoint_bytes, free_bytes, run_need
from .dry_run import dry_run_report
from .store import FollowerStore, RunStore, atomic_write_bytes
from .streams import SpilledStreams, capture, cast_floats

# config fields that do not change what the layer-wise pass computes: a re-run that differs
# only in them resumes
NOT_FINGERPRINTED = ("out", "overwrite", "eval_text", "eval_tokens", "eval_seq_len", "device", "exports")


def fingerprint(res: Resolved, folder: Path) -> str:
    """What a run computes: its resolved config and the source model's weights by content."""
    files = weights_digest(folder)
    d = res.describe()
    for k in NOT_FINGERPRINTED:
        d.pop(k, None)
    d["resolved_options"] = {k: v for k, v in d["resolved_options"].items() if not k.startswith("exporter:")}
    return hashlib.sha1(json.dumps([d, files, __version__], sort_keys=True, default=str).encode()).hexdigest()


def batch_size(configured: int, device) -> int:
    """Calibration samples per block forward: as configured, else 8 on CUDA (one sample per
    kernel launch wastes a GPU) and 1 on a CPU (measured on SmolLM2: no faster with 8, while its
    activations cost 100-300 MB more peak RSS)."""
    return configured or (8 if device.type == "cuda" else 1)


def few_tokens_warning(tokens: int, widest_input: int, factor: int = 4) -> str | None:
    """Hessian-based projectors overfit when H = X X^T / N comes from too few tokens."""
    if tokens >= factor * widest_input:
        return None
    return (f"calibration has {tokens} tokens, fewer than {factor} x the widest layer input ({widest_input}); "
            f"Hessian-based methods (GPTQ, corrections) may overfit: raise --num-samples or the damping")


def nonfinite_error(name: str, W: torch.Tensor) -> None:
    """A one-line error naming the tensor when its weights are not all finite."""
    bad = int((~torch.isfinite(W)).sum())
    if bad:
        nan = int(torch.isnan(W).sum())
        raise OnecompError(f"{name}.weight has {bad} non-finite values ({nan} NaN, {bad - nan} inf) of {W.numel()}: "
                           f"the checkpoint is damaged or overflowed; repair it or --exclude {name}")


def refine_pending(out: Path, fp: str) -> bool:
    """``out`` holds the pivot of this very run and its refine stage has not finished (a rerun
    after a kill during the refine stage resumes there)."""
    if not (out / "onecomp.json").is_file() or not refine_work(out).is_dir():
        return False
    try:
        return read_meta(out).get("fingerprint") == fp
    except (OnecompError, json.JSONDecodeError):
        return False


REFINE_SAMPLES_AUTO = 128     # auto: model refiners train on 4x the layer-wise pass's samples, at most this many


def refine_counts(cal, available: int | None = None) -> tuple[int, int]:
    """(samples the model refiners train on, held-out samples judging them): ``refine_samples``,
    or where it is 0 (auto) 4x the layer-wise pass's ``num_samples`` up to REFINE_SAMPLES_AUTO
    (never fewer than ``num_samples``), fewer where the source gives only ``available`` samples in
    all; ``heldout`` (default: 10% of the training samples, at least 1)."""
    def held(t):
        return cal.heldout or max(1, -(-t // 10))
    if cal.refine_samples:
        train = max(cal.refine_samples, cal.num_samples)
    else:
        train = min(4 * cal.num_samples, max(REFINE_SAMPLES_AUTO, cal.num_samples))
        while available is not None and train > cal.num_samples and train + held(train) > available:
            train -= 1
    return train, held(train)


class Runner:
    """One run's stages. ``refine_only``: the output folder already holds a checkpoint (the
    pivot, or a refined one): plan from its metadata and run only the refiners on it (its model
    refiners, and block refiners over its blocks; a quantize run resuming its refine stage also
    plans from the checkpoint, but its block refiners ran inside its pass already)."""

    def __init__(self, res: Resolved, refine_only: bool = False, dry_run: bool = False):
        self.res, self.run_cfg = res, res.run
        self.refine_only = refine_only
        self.dry_run = dry_run                       # up to the plan and the choice, writing nothing
        self.checkpoint_blocks = refine_only         # `onecomp refine`: block refiners run over the checkpoint
        self.refine_store = None
        self.layers = None
        self.start = 0
        self.skipped: set[str] = set()
        self.t_start = time.time()
        self.hook = res.plugins.hook
        self.stages: dict[str, float] = {}
        self.stage_memory: dict[str, dict] = {}        # resident and peak RSS when each stage ended
        self.transforms: list[tuple[str, Transform]] = []
        self.refined: list[dict] = []
        self.exported: dict[str, list[str]] = {}
        self.timing = {"block_seconds": []}
        self.evaluation = None

    def stage(self, name, fn, **info):
        self.hook.onecomp_stage_start(stage=name, info=info)
        t0 = time.time()
        own = reset_stage_peak()
        start = rss_mb()
        result = fn()
        self.stages[name] = time.time() - t0
        # resident at the start and end, and the process's peak so far
        self.stage_memory[name] = {"start_rss_mb": round(start, 1), "rss_mb": round(rss_mb(), 1),
                                   "peak_rss_mb": round(peak_rss_mb(), 1)}
        if own:                                      # this stage's own peak (the one above is the process's so far)
            self.stage_memory[name]["stage_peak_rss_mb"] = round(stage_peak_mb(), 1)
        self.hook.onecomp_stage_finish(stage=name, info={"seconds": self.stages[name]})
        return result

    def run(self) -> dict:
        self.ranks = start_ranks(self.run_cfg.device)    # one process unless torchrun launched several
        if self.ranks.active:
            if self.dry_run:
                raise OnecompError("a dry run plans in one process: run it without torchrun")
            self.check_data_parallel()
        t_start = time.time()
        self.threads = set_threads()
        self.stage("open_model", self.open_model)
        self.preflight()
        self.stage("calibration", self.calibrate)
        if self.refine_only:
            self.stage("plan", self.plan_from_checkpoint)
            if self.dry_run:
                self.stage("estimate", self.estimate_refine_stage)
                return dry_run_report(self, time.time() - t_start)
        else:
            self.stage("capture", self.capture)
            if self.res.preprocessors:
                self.stage("preprocess", self.preprocess)
            self.stage("plan", self.plan)
            if self.dry_run:
                self.block_timing = self.stage("time_block", self.time_first_block)
                return dry_run_report(self, time.time() - t_start)
            if self.start < len(self.sk.blocks):
                self.stage("layerwise", self.layerwise, total=len(self.sk.blocks))
            if not self.ranks.leader and not self.parallel_refine():    # the leader alone exports and evaluates
                return self.follower_report(time.time() - t_start)
            if self.ranks.leader:
                self.stage("export", self.export)
        if self.stage_refiners():
            if not self.refine_only and self.ranks.leader:
                self.publish_pivot(time.time() - t_start)
            self.ranks.barrier()                     # data-parallel refiners start from the published pivot
            self.stage("refine", self.refine)
        if not self.ranks.leader:
            return self.follower_report(time.time() - t_start)
        if self.eval_ids is not None:
            self.stage("evaluate", self.evaluate)
        return self.finish(time.time() - t_start)

    # -- stages ------------------------------------------------------------------------------
    def open_model(self) -> None:
        run = self.run_cfg
        self.folder = resolve_model(run.model)
        self.device = rank_device(pick_device(run.device))
        self.batch = batch_size(run.calibration.batch_size, self.device)
        self.sk = Skeleton(self.folder, self.res.plugins.registry, self.device, run.dtype, run.store_dtype)
        # auto: block refiners (LPCD, blockptq) keep every forward in the compute dtype; measured: a
        # tiny MoE's expert routed differently under bfloat16 gave LPCD a 100x layer error
        fd = run.calibration.forward_dtype
        fd = "off" if fd == "auto" and self.res.refiners_of("block") else fd
        self.forward_dtype = forward_autocast(fd, self.device, self.sk.dtype)
        name = lambda d: str(d or self.sk.dtype).replace("torch.", "")
        streams = None if run.calibration.forward_dtype == "statistics" else self.forward_dtype
        self.forward_dtypes = {"statistics": name(self.forward_dtype), "streams": name(streams)}
        self.shapes = self.sk.linear_shapes()
        self.fingerprint = fingerprint(self.res, self.folder)
        out = Path(run.out)
        resuming = not self.refine_only and not run.overwrite and refine_pending(out, self.fingerprint)
        if resuming:
            self.refine_only = True                  # killed during the refine stage: resume it
        self.refine_only = self.ranks.broadcast(self.refine_only)       # the leader's view of the folder
        if self.refine_only and self.ranks.active and not self.parallel_refine():
            serial = [r.name for r in self.stage_refiners() if not r.data_parallel]
            raise OnecompError(f"refining a finished checkpoint with {', '.join(serial) or 'no model refiner'} runs "
                               f"in one process: run `onecomp refine` without torchrun")
        if self.refine_only:
            self.base_report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else {}
            self.outlook = ("resume refine", f"resumes the unfinished refine stage of {out} (its pivot is saved)") \
                if resuming else ("refine", f"refines the checkpoint in {out} in place (keeping only what lowers "
                                            f"the held-out KL)")
        else:                                        # only the leader writes; it says where to resume
            self.store = self.ranks.leader_does(lambda: RunStore(out, self.fingerprint, run.overwrite, self.dry_run),
                                                share=False) \
                or FollowerStore(out, self.ranks.rank)
            self.start = self.ranks.broadcast(self.store.finished if self.ranks.leader else None)
            self.outlook = self.store.outlook if self.ranks.leader else None
        from transformers import AutoTokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder))
        # read the evaluation text now: a wrong path should stop the run before the long work
        self.eval_ids = text_tokens(self.tokenizer, run.eval_text, run.eval_tokens) if run.eval_text else None
        self.bos = bos_id(self.tokenizer, run.bos)

    def preflight(self) -> None:
        """Checks that need the model's shape but no data, before the long work: sequence
        lengths against the model's positions, a writable output folder, (uniform planner) the
        whole plan against formats, projectors, exporters and refiners, and an explicit --max-memory against the
        layer-wise pass's estimated need."""
        run, sk = self.run_cfg, self.sk
        positions = getattr(sk.config, "max_position_embeddings", None)
        lengths = [("--seq-len", run.calibration.seq_len)] + ([("eval_seq_len", run.eval_seq_len)] if run.eval_text else [])
        for flag, n in lengths:
            if positions and n > positions:
                raise OnecompError(f"{flag} {n} is longer than the {positions} positions the model handles; "
                                   f"use at most {positions}")
        if not self.refine_only:
            out = Path(run.out).absolute()
            ancestor = next(p for p in (out.parent, *out.parent.parents) if p.exists())
            if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
                raise OnecompError(f"cannot write the output folder {run.out}: {ancestor} is not a writable folder; "
                                   f"choose another --out")
            for e in self.res.exporters:
                e.check_model(sk.config_dict(), self.folder, self.shapes)
            if run.planner == "uniform":         # the plan is known already: check it whole now
                self.check_specs(uniform_specs(run, self.shapes, self.res.formats[run.format],
                                               sk.store_dtype).values())
            if run.max_memory is not None:       # an explicit --max-memory the pivot cannot fit in
                RefineChoice(run, (), self.device, time.time()).check_pivot(self.layerwise_need_bytes())

    def check_data_parallel(self) -> None:
        """What a data-parallel run can do, checked before any work: the layer-wise pass with its
        statistics, corrections and data-parallel block refiners is sharded (others are refused);
        model refiners run on the leader alone."""
        inner = [r.name for r in self.res.refiners_of("block") if not r.data_parallel]
        if inner:
            raise OnecompError(f"{inner[0]} refines blocks inside the layer-wise pass and does not run data-parallel: "
                               f"run it in one process (without torchrun), or drop --refiner {inner[0]}")
        n = self.run_cfg.calibration.num_samples
        if n < self.ranks.world:
            raise OnecompError(f"{n} calibration samples cannot be shared by {self.ranks.world} ranks: "
                               f"raise --num-samples to at least {self.ranks.world} or start fewer processes")
        model = self.res.refiners_of("model")
        serial = [r.name for r in model if not r.data_parallel]
        if serial and self.ranks.leader:
            print(f"onecomp: note: {', '.join(r.name for r in model)} will run on rank 0 alone after the data-parallel pivot "
                  f"({', '.join(serial)}: not a data-parallel model refiner)", file=sys.stderr)

    def parallel_refine(self) -> bool:
        """Whether the model refiners run on every rank: a data-parallel run whose model refiners
        all say ``data_parallel`` (one that does not makes rank 0 run them all alone)."""
        model = self.stage_refiners()
        return self.ranks.active and bool(model) and all(r.data_parallel for r in model)

    def stage_refiners(self) -> list:
        """The refine stage's steps, in config order: the model refiners; refining a finished
        checkpoint (`onecomp refine`), also each block refiner's pass over its blocks (before the
        same refiner's model scope, if it has one)."""
        if not self.checkpoint_blocks:
            return self.res.refiners_of("model")
        steps = []
        for r in self.res.refiners:
            scopes = r.active_scopes()
            if "block" in scopes:
                steps.append(CheckpointBlocks(r, self.res.plugins, self.batch, self.checkpoint_pass_estimate))
            if "model" in scopes:
                steps.append(r)
        return steps

    def check_specs(self, specs) -> None:
        """Every module's spec against its format, its projector, the exporters and the refiners."""
        res = self.res
        for spec in specs:
            fmt = res.formats.setdefault(spec.format, res.component("format", spec.format))
            proj = res.projectors.setdefault(spec.projector, res.component("projector", spec.projector))
            fmt.check(spec, self.shapes[spec.name])
            proj.check(spec, fmt)
            for e in res.exporters:
                e.check(spec, fmt)
            for r in res.refiners:
                r.check(spec, fmt)

    def calibrate(self) -> None:
        cal = self.run_cfg.calibration
        train, heldout = (cal.num_samples, 0)
        if self.stage_refiners():
            have = None if cal.refine_samples else available_samples(
                cal.source, self.tokenizer, cal.seq_len, cal.strategy, cal.text_field, cal.split, bos=self.bos,
                use_cache=cal.cache)
            train, heldout = refine_counts(cal, have)
        ids = calibration_samples(cal.source, self.tokenizer, train, cal.seq_len, cal.strategy,
                                  cal.seed, cal.text_field, cal.split, cal.cache, bos=self.bos, heldout=heldout)
        # the layer-wise pass: the first num_samples; model refiners: the first `train`; the rest (spread
        # over the source) judges them; block refiners on a finished checkpoint: the layer-wise pass's
        # (as they had inside it), unless refine_samples was set
        self.ids, self.refine_ids, self.heldout_ids = ids[:cal.num_samples], ids[:train], ids[train:]
        self.block_refine_ids = self.refine_ids if cal.refine_samples else self.ids

    def capture(self) -> None:
        self.inputs, self.kwargs = capture(self.sk, self.ids)

    def preprocess(self) -> None:
        """Fit each preprocessor in config order on the model transformed by the ones before it;
        the blocks and the outer modules are transformed as they are loaded from then on."""
        sk, run = self.sk, self.run_cfg
        captured = {0: (self.inputs, self.kwargs)}
        for k, pre in enumerate(self.res.preprocessors):
            def inputs(k=k):
                if k not in captured:
                    captured[k] = capture(sk, self.ids)
                return captured[k]
            ctx = PreprocessContext(run=run, adapter=sk.adapter, num_blocks=len(sk.blocks), block=sk.block,
                                    release=sk.release_block, block_prefix=sk.block_prefix, inputs=inputs,
                                    calibration_ids=self.ids, device=self.device,
                                    batch=self.batch, model_config=sk.config, outer=self.outer_for_fit,
                                    release_outer=sk.release_outer,
                                    max_memory=memory_budget(run.max_memory, self.device),
                                    project=self.project_uniform)
            t = pre.fit(ctx)
            if not isinstance(t, Transform):
                raise OnecompError(f"preprocessor {pre.name!r}: fit() returned {type(t).__name__}, not a Transform")
            sk.transforms.append(t)
            self.transforms.append((pre.name, t))
        del captured
        self.inputs, self.kwargs = capture(sk, self.ids)          # block-0 inputs under every transform
        release_memory()              # the fits' temporaries, else kept by the C heap into the layer-wise stage

    def project_uniform(self, name: str, W: torch.Tensor, H: torch.Tensor | None) -> torch.Tensor | None:
        """W^ = the run's projector on W (input Gram H) under the run's one spec for ``name``,
        dequantized to float32; None when ``name`` is excluded (a preprocessor's fit may judge a
        transform by the error the real quantizer leaves, not a proxy's)."""
        run = self.run_cfg
        if excluded(name, run.exclude):
            return None
        fmt = self.res.formats[run.format]
        spec = uniform_specs(run, {name: tuple(W.shape)}, fmt, self.sk.store_dtype)[name]
        qt = self.res.component("projector", spec.projector).project(W.float(), H, spec, fmt)
        return qt.dequantize(torch.float32)

    def outer_for_fit(self):
        """(final norm, head) of the model, loaded with the transforms so far (a preprocessor's fit)."""
        self.sk.fill_outer()
        return self.sk.final_norm(), self.sk.model.get_output_embeddings()

    def plan(self) -> None:
        res, run, sk = self.res, self.run_cfg, self.sk
        batch = self.batch
        memo = {}

        def input_diag():
            if "diag" not in memo:
                memo["diag"] = input_diagonals(sk, self.inputs, self.kwargs, batch=batch)
            return memo["diag"]

        groups = [[f"{sk.block_prefix(i)}.{n}" for n in g] for i, blk in enumerate(sk.blocks)
                  for g in sk.adapter.linear_groups(blk)]
        ctx = PlanContext(shapes=self.shapes, groups=groups, run=run, formats=res.formats,
                          registry=res.plugins.registry, checkpoint_dtype=sk.store_dtype,
                          weight=lambda n: sk.linear_weight(n).float(), input_diag=input_diag,
                          input_grams=lambda fn: input_statistics(sk, self.inputs, self.kwargs, fn, batch=batch),
                          model_folder=self.folder, calibration_ids=self.ids, device=self.device, make=res.component,
                          model_config=sk.config, param_count=sum(sk.weights.numel(k) for k in sk.weights.keys()))
        self.plan_ = self.ranks.leader_does(lambda: res.planner.plan(ctx))     # one plan for every rank
        self.check_specs(self.plan_.specs.values())   # the whole plan, before any block is quantized
        self.settle_formats()
        if not self.transforms:                      # under transforms the block pass checks each weight
            stored = set(sk.weights.keys())          # (so does it for weights stored fused, e.g. MoE experts)
            for name in self.plan_.specs:
                if name + ".weight" in stored:
                    nonfinite_error(name, sk.linear_weight(name))
        notes = [n for n in (getattr(res.formats.get(s.format), "storage_note", lambda *a: None)(s, self.shapes[s.name])
                             for s in self.plan_.specs.values()) if n]
        if notes:
            more = f" (and {len(notes) - 1} more modules)" if len(notes) > 1 else ""
            print(f"onecomp: note: {notes[0]}{more}", file=sys.stderr)
        self.needs = self.statistics_needed()
        few = few_tokens_warning(int(self.ids.numel()), max(s[1] for s in self.shapes.values())) \
            if "gram" in self.needs else None
        if few:
            print(f"onecomp: warning: {few}", file=sys.stderr)
        self.choose_block_refiners()
        self.check_disk()

    def layerwise(self, stop: int | None = None, store=None) -> None:
        """The pass over blocks ``self.start``..``stop`` - 1 into ``store`` (default: the run's)."""
        res, store = self.res, store or self.store
        n = self.run_cfg.calibration.num_samples
        mine = self.ranks.shard(n)                   # data-parallel: this rank's samples of both streams
        if self.start > 0:
            streams = self.ranks.leader_does(lambda: self.store.streams())
            fp, q = streams["fp"][mine].to(self.device), streams["q"][mine].to(self.device)
        else:
            fp = self.inputs[mine].clone() if self.ranks.active else self.inputs
            q = fp.clone()
        self.inputs = streams = None
        block_refiners = self.block_refiners_to_run()
        self.spilled = self.streams_spill(*self.layerwise_parts())
        spill = SpilledStreams(store.work / "spill", fp.shape, fp.dtype) if self.spilled else None
        lw = LayerwisePass(self.sk, self.plan_, res.projectors, res.formats, res.refiners_of("layer"),
                           block_refiners, store, self.hook, self.needs, self.batch, spill=spill,
                           ranks=self.ranks, stats_dtype=getattr(torch, self.run_cfg.calibration.stats_dtype),
                           forward_dtype=self.forward_dtype,
                           stream_autocast=self.run_cfg.calibration.forward_dtype != "statistics")
        try:
            self.timing = lw.run(fp, q, self.kwargs, self.start, samples=n, stop=stop)
        finally:
            if spill is not None:
                spill.remove()

    def time_first_block(self) -> float | None:
        """A dry run's timing: the layer-wise pass over the first block to do (block refiners
        included), its tensors and streams dropped (a store that writes nothing, its spilled
        streams in a throwaway folder); -> seconds, or None when the run would resume (its
        streams are the work folder's, which a dry run leaves alone)."""
        if self.start > 0:
            return None
        with tempfile.TemporaryDirectory(prefix="onecomp-dry-run-") as tmp:
            self.layerwise(stop=1, store=FollowerStore(Path(tmp) / "out", 0))
        return self.timing["block_seconds"][0]

    def block_refiners_to_run(self) -> list:
        """The block refiners of the layer-wise pass, less those the refine choice skipped."""
        return [r for r in self.res.refiners_of("block") if r.name not in self.skipped]

    # -- the resource-adaptive choice (--refine auto, --max-memory, --time-budget) ---------------
    def layerwise_need_bytes(self) -> int:
        """Rough peak of the layer-wise pass (the streams not counted when they go to disk)."""
        base, streams = self.layerwise_parts()
        return base if self.streams_spill(base, streams) else base + streams

    def layerwise_parts(self, rows: int | None = None, needs: set | None = None,
                        replays: int | None = None) -> tuple[int, int]:
        """(bytes of the layer-wise pass besides its streams, bytes of the two streams and the
        replayed attention outputs), for this run's pass, or with ``rows`` samples, ``needs``
        statistics and ``replays`` replayed records (a block refiner's pass over a finished
        checkpoint: its samples, no statistics, no replays). The first:
        what is resident now (skeleton, calibration inputs), three copies of the largest block
        (live, FP copy, loading), the largest input statistics (H, and C when paired; none when
        nothing is gathered: RTN, or a pass over a checkpoint's blocks) and, for a
        Hessian-based projector, its work on the widest H: at most four float64 copies at once
        during the damped Cholesky factorisation and its inverse, and the float32 factor (36
        bytes per entry: 2.4 GB for an 8192-wide down_proj)."""
        sk = self.sk
        width = torch.finfo(sk.dtype).bits // 8
        block = self.largest_block_params()
        stream = self.stream_bytes(rows)
        widest = max(s[1] for s in self.shapes.values())
        needs = self.statistics_needed() if needs is None else needs
        stats = widest * widest * 4 * (2 if {"cross", "residual"} & needs else 1) if needs else 0
        factor = widest * widest * 36 if "gram" in needs else 0
        # the attention's output replayed in later forwards (replay.py): one stream-size record,
        # two with paired statistics, and o_proj's input while the first is made; none when block
        # refiners run or the streams go to disk
        if replays is None:
            replays = 0 if self.res.refiners_of("block") else (3 if {"cross", "residual"} & needs else 2)
        return int(rss_mb() * 2**20 + 3 * block * width + stats + factor), (2 + replays) * stream

    def stream_bytes(self, rows: int | None = None) -> int:
        """One hidden-state stream of the pass: ``rows`` samples (default: this rank's shard)."""
        sk, cal = self.sk, self.run_cfg.calibration
        rows = -(-cal.num_samples // self.ranks.world) if rows is None else rows
        return rows * cal.seq_len * int(getattr(sk.config, "hidden_size", 0)) * (torch.finfo(sk.dtype).bits // 8)

    def streams_spill(self, base: int, streams: int) -> bool:
        """The two streams go to files on disk when asked, or when an explicit --max-memory leaves
        no room for them beside the rest of the pass (``base`` bytes)."""
        run = self.run_cfg
        return run.spill_streams == "always" or (
            run.spill_streams == "auto" and run.max_memory is not None and base + streams > parse_size(run.max_memory))

    def statistics_needed(self) -> set:
        """The input statistics the layer-wise pass gathers: H where a projector needs it, and
        what the layer corrections ask for."""
        res = self.res
        needs = {"gram"} if any(p.needs_hessian for p in res.projectors.values()) else set()
        for c in res.refiners_of("layer"):
            needs |= set(c.statistics)
        return needs

    def largest_block_params(self) -> int:
        """Parameters of the largest block (read once from the checkpoint's index)."""
        if not hasattr(self, "_largest_block"):
            sk = self.sk
            self._largest_block = max(sum(sk.weights.numel(k) for k in sk.weights.keys()
                                          if k.startswith(sk.block_prefix(i) + ".")) for i in range(len(sk.blocks)))
        return self._largest_block

    def estimate_context(self, train_samples: int | None = None) -> EstimateContext:
        """What block refiners' estimates see: this run's shape and samples (``train_samples``
        for a pass over a finished checkpoint)."""
        sk, cal = self.sk, self.run_cfg.calibration
        sizes = [[n for n in self.plan_.specs if n.startswith(sk.block_prefix(i) + ".")] for i in range(len(sk.blocks))]
        weights = max(sum(self.shapes[n][0] * self.shapes[n][1] for n in ns) for ns in sizes)
        return EstimateContext(model_config=sk.config, num_blocks=len(sk.blocks), block_weights=weights,
                               block_params=self.largest_block_params(),
                               train_samples=cal.num_samples if train_samples is None else train_samples,
                               seq_len=cal.seq_len,
                               device=self.device, time_block_step=self.time_block_step)

    def checkpoint_pass_estimate(self, rows: int, checkpoint: Path):
        """(EstimateContext, bytes) of a block refiner's pass over the blocks of the finished
        ``checkpoint`` on ``rows`` samples: the layer-wise pass with no statistics and no
        replays; the probe trains block 0 through the trainable views of its stored tensors."""
        def probe():                 # the checkpoint is opened only if the refiner asks for the timing
            return self.time_block_step(stored_modules(checkpoint, self.res.plugins.registry))
        ectx = attrs.evolve(self.estimate_context(rows), time_block_step=probe, step_with_views=True)
        return ectx, sum(self.layerwise_parts(rows, needs=set(), replays=0))

    def time_block_step(self, stored=None) -> float:
        """Seconds of one float32 forward + backward of block 0 on one calibration sample (the
        second of two, the first warms up); with ``stored`` (module name -> its stored tensor),
        the gradients go to the trainable views of block 0's quantized linears instead."""
        blk = copy.deepcopy(self.sk.block(0)).float()
        self.sk.release_block(0)
        for p in blk.parameters():
            p.requires_grad_(stored is None)
        if stored is not None:
            prefix = self.sk.block_prefix(0) + "."
            names = [n for n in self.plan_.specs if n.startswith(prefix)]
            attach_views(blk, {n[len(prefix):]: stored[n] for n in names},
                         {n[len(prefix):]: self.plan_[n] for n in names}, self.res.formats)
        inputs, kwargs = (self.inputs, self.kwargs) if hasattr(self, "inputs") else capture(self.sk, self.ids[:1])
        x, kw = inputs[:1].float(), cast_floats(kwargs[0], torch.float32)
        secs = 0.0
        for _ in range(2):
            t0 = time.time()
            with torch.enable_grad():
                y = blk(x, **kw)
                (y[0] if isinstance(y, tuple) else y).float().pow(2).mean().backward()
            secs = time.time() - t0
        return secs

    def refine_choice(self) -> RefineChoice:
        """The resource-adaptive choice of this run, with the refiners ``--refine auto`` had to
        leave out already recorded."""
        choice = RefineChoice(self.run_cfg, self.res.auto_refiners, self.device, self.t_start)
        choice.decisions.extend(self.res.auto_dropped)
        return choice

    def choose_block_refiners(self) -> None:
        res = self.res
        self.choice = self.refine_choice()
        need = self.layerwise_need_bytes()
        self.choice.check_pivot(need)
        for r in res.refiners_of("block"):
            if not self.choice.allow(r, r.estimate(self.estimate_context()), base=need):
                self.skipped.add(r.name)

    def plan_from_checkpoint(self) -> None:
        """The plan the checkpoint in ``out`` was made with (its onecomp.json), checked against
        the refiners asked for before any work."""
        res = self.res
        modules = read_meta(Path(self.run_cfg.out))["modules"]
        LazyWeights(Path(self.run_cfg.out))          # every file's header read: a damaged one is named now
        names = {a.name for a in LayerSpec.__attrs_attrs__}
        self.plan_ = Plan(specs={n: LayerSpec(**{k: v for k, v in m.items() if k in names}) for n, m in modules.items()})
        self.shapes = {n: tuple(m["shape"]) for n, m in modules.items()}
        for spec in self.plan_.specs.values():
            fmt = res.formats.setdefault(spec.format, res.component("format", spec.format))
            for r in res.refiners:
                r.check(spec, fmt)
        self.settle_formats()                        # the storage choices the checkpoint was written with
        self.check_disk()

    def check_disk(self) -> None:
        """What the run will write (disk.run_need) against the free space beside ``--out``, before
        the first block; recorded for the report and the dry run."""
        if not self.ranks.leader:
            return
        out = Path(self.run_cfg.out)
        if self.refine_only:                         # one candidate beside the checkpoint
            ckpt = sum(p.stat().st_size for p in out.glob("*.safetensors"))
            need = run_need(ckpt, 0, 0, 0, refiners=False)
        else:
            sk = self.sk
            prefixes = tuple(sk.block_prefix(i) + "." for i in range(len(sk.blocks)))
            ckpt, in_blocks = checkpoint_bytes(self.plan_, self.res.formats, self.shapes, sk.weights, sk.store_dtype,
                                               lambda k: k.startswith(prefixes))
            data_free, fp_stream = streams_used(self.statistics_needed(), self.res.refiners_of("layer"),
                                                self.block_refiners_to_run())
            stream = 0 if data_free else self.stream_bytes() * (1 + fp_stream)   # the streams saved between blocks
            spilled = 2 * stream if self.streams_spill(*self.layerwise_parts()) else 0   # two buffers a stream
            blocks = len(sk.blocks)
            need = run_need(ckpt, in_blocks * (blocks - self.start) // blocks, stream, spilled,
                            bool(self.stage_refiners()))
            need += ckpt * max(0, len(self.res.exporters) - 1)           # each extra export beside it
        where, free = free_bytes(out)
        self.disk = {"need_mb": round(need / 2**20, 1), "free_mb": round(free / 2**20, 1), "where": str(where),
                     "checkpoint_mb": round(ckpt / 2**20, 1)}
        check_disk(need, out)

    def settle_formats(self) -> None:
        """Each format sees the whole plan before any tensor is written (``Format.settle``)."""
        specs = list(self.plan_.specs.values())
        for name, fmt in self.res.formats.items():
            fmt.settle([s for s in specs if s.format == name], self.shapes)

    def publish_pivot(self, wall: float) -> None:
        """The layer-wise result becomes ``out`` (complete, loadable, with its report) before any
        model refiner starts; the refine stage's work folder exists first, so a kill from here
        on resumes the refine stage."""
        self.layers = self.store.layer_info()
        self.peak_pivot = peak_rss_mb()
        self.peak_quantize = self.peak_pivot
        work = RefineStore(self.store.out, self.fingerprint).work
        shutil.rmtree(work, ignore_errors=True)          # a new pivot: any earlier refine state is stale
        work.mkdir(parents=True)
        report = self.report(wall)
        del self.peak_quantize                       # measured again when the run ends
        write_reports(self.final, report)
        self.store.publish(self.final)
        self.base_report = report

    def refine(self) -> None:
        run = self.run_cfg
        ranks = self.ranks if self.ranks.active else None
        self.refine_store = RefineStore(Path(run.out), self.fingerprint) if self.ranks.leader else None
        judge = heldout_reference(self.folder, self.heldout_ids, self.device, run.dtype, self.res.plugins) \
            if self.ranks.leader else None
        if not hasattr(self, "choice"):
            self.choice = self.refine_choice()

        def choose(refiner, mctx) -> dict:
            # the held-out judgement of the checkpoint has just run; the candidate's repeats it
            judged = peak_gpu_mb() if self.device.type == "cuda" else peak_rss_mb()
            return self.choice.decide(refiner, refiner.estimate(mctx), floor=int((judged or 0) * 2**20))

        try:
            self.refined = run_model_refiners(
                self.stage_refiners(), self.refine_store, plan=self.plan_, formats=self.res.formats,
                plugins=self.res.plugins, reference=self.folder, load_reference=self.reference_model, heldout_ref=judge,
                train_ids=self.refine_ids, block_train_ids=self.block_refine_ids,
                heldout_ids=self.heldout_ids, device=self.device, run=run, choose=choose, ranks=ranks, out=Path(run.out))
        except OnecompError:
            # `onecomp refine` stopped with one line (over --max-memory, a damaged checkpoint) before any
            # refiner finished or kept state: the checkpoint is as it was, nothing to resume
            st = self.refine_store
            if self.refine_only and st is not None and not st.records() and not any(st.work.glob("refiner-*")):
                shutil.rmtree(st.work, ignore_errors=True)
            raise
        finally:
            self._reference = None                   # the FP model goes before the evaluation loads its own
        if self.ranks.leader:
            self.final = self.refine_store.current

    def reference_model(self):
        """The FP model, loaded when a refiner first asks for it and kept by this run for the ones
        after it in the refine stage (released when the stage ends)."""
        if getattr(self, "_reference", None) is None:
            self._reference = load_reference(str(self.folder), str(self.device), self.run_cfg.dtype)[0]
        return self._reference

    def estimate_refine_stage(self) -> None:
        """A dry run of the refine stage: each step's estimate on the checkpoint in ``--out`` as it
        is (its timed probes included) and the choice, in order; nothing is trained or judged, and
        a probe's scratch goes to a throwaway folder."""
        run = self.run_cfg
        self.choice = self.refine_choice()
        with tempfile.TemporaryDirectory(prefix="onecomp-dry-run-") as tmp:
            for r in self.stage_refiners():
                mctx = model_context(r, Path(run.out), Path(tmp) / r.name, plan=self.plan_, formats=self.res.formats,
                                     plugins=self.res.plugins, reference=self.folder, load_reference=self.reference_model,
                                     train_ids=self.refine_ids, block_train_ids=self.block_refine_ids,
                                     heldout_ids=self.heldout_ids, device=self.device, run=run)
                self.choice.decide(r, r.estimate(mctx))
        self._reference = None

    def export(self) -> None:
        res = self.res
        final = self.store.work / "final"
        if final.exists():
            shutil.rmtree(final)
        final.mkdir(parents=True)
        ectx = self.export_context(final)
        for e in res.exporters:
            self.exported[e.name] = e.export(ectx)
        for fname, data in self.plan_.artifacts.items():
            atomic_write_bytes(final / fname, data)
        self.final = final

    def export_context(self, folder: Path) -> ExportContext:
        """What the exporters write into ``folder``: the committed blocks, the outer tensors and
        ``config.json`` as the transforms left them."""
        plan = self.plan_
        config = self.sk.config_dict()
        for _, t in self.transforms:
            config.update(t.checkpoint_config())
        tied = bool(config.get("tie_word_embeddings", getattr(self.sk.config, "tie_word_embeddings", False)))
        return ExportContext(
            folder=folder, plan=plan, formats=self.res.formats, shapes=self.shapes,
            block_files=[self.store.block_file(i) for i in range(len(self.sk.blocks))],
            outer_tensors=lambda: self.sk.outer_tensors(tied), config=config,
            meta={"onecomp_version": __version__, "config": self.res.describe(), "source_model": str(self.folder),
                  "fingerprint": self.fingerprint,
                  "transforms": [{"name": n, **t.describe()} for n, t in self.transforms]},
            source_folder=self.folder, checkpoint_dtype=self.sk.store_dtype,
            modules={n: {**s.to_dict(), "shape": list(self.shapes[n])} for n, s in plan.specs.items()})

    def evaluate(self) -> None:
        run = self.run_cfg
        self.peak_quantize = peak_rss_mb()
        self.tokenizer = None                        # calibration is done: the ids are all it needed
        release_memory()
        ref = measure_reference(str(self.folder), self.eval_ids, seq_len=run.eval_seq_len, bos=self.bos,
                                device=run.device, dtype=run.dtype, plugins=self.res.plugins)   # block by block
        release_memory()
        qmodel = load_quantized(self.final, run.device, run.dtype, self.res.plugins)
        self.evaluation = evaluate(qmodel, self.eval_ids, ref=ref, seq_len=run.eval_seq_len, bos=self.bos)

    def follower_report(self, wall: float) -> dict:
        """What a rank other than 0 returns once its shard of the layer-wise pass is done."""
        if hasattr(self, "store"):
            shutil.rmtree(self.store.work, ignore_errors=True)   # its spilled streams' folder, if any
        shard = self.ranks.shard(self.run_cfg.calibration.num_samples)
        return {"rank": self.ranks.rank, "out": None,
                "summary": {"rank": self.ranks.rank, "ranks": self.ranks.world, "wall_seconds": round(wall, 2),
                            "peak_rss_mb": round(peak_rss_mb(), 1), "resumed_from_block": self.start,
                            "samples": shard.stop - shard.start}}

    def finish(self, wall: float) -> dict:
        if not hasattr(self, "peak_quantize"):
            self.peak_quantize = peak_rss_mb()
        report = self.report(wall)
        write_reports(self.final, report)
        if self.refine_store is not None:
            self.refine_store.publish()
        else:
            self.store.publish(self.final)
        report["out"] = str(Path(self.run_cfg.out))
        self.hook.onecomp_run_finish(report=report)
        return report

    def report(self, wall: float) -> dict:
        if self.refine_only:
            return self.refine_report(wall)
        plan, res, run, shapes = self.plan_, self.res, self.run_cfg, self.shapes
        layers = self.layers if self.layers is not None else self.store.layer_info()
        total_bits = sum(layers[n]["bpw"] * shapes[n][0] * shapes[n][1] for n in plan.specs if n in layers)
        params = sum(shapes[n][0] * shapes[n][1] for n in plan.specs)
        bs = self.timing["block_seconds"]
        summary = {"model": str(run.model), "source_folder": str(self.folder), "format": run.format,
                   "projector": run.projector, "preprocessors": list(run.preprocessors), "refiners": list(run.refiners),
                   "planner": run.planner, "bits": run.bits, "group_size": run.group_size, "symmetric": run.symmetric,
                   "bpw": round(total_bits / max(params, 1), 4), "quantized_params": params,
                   "wall_seconds": round(wall, 2), "seconds_per_block": round(sum(bs) / len(bs), 3) if bs else None,
                   "peak_rss_mb": round(self.peak_quantize, 1), "peak_gpu_mb": peak_gpu_mb(),
                   "peak_rss_mb_with_eval": round(peak_rss_mb(), 1) if self.evaluation else None,
                   "resumed_from_block": self.start, "device": str(self.device), "ranks": self.ranks.world,
                   "calibration_forwards": self.timing.get("calibration_forwards", True),
                   "threads": getattr(self, "threads", None),
                   "forward_dtype": getattr(self, "forward_dtypes", None),
                   "streams_on_disk": bool(getattr(self, "spilled", False)),
                   "stage": "refined" if any(r["kept"] for r in self.refined) else "pivot", **self.sizes()}
        return {"summary": summary, "stages": self.stages, "stage_memory": self.stage_memory,
                "block_rss_mb": self.timing.get("block_rss_mb", []), "layers": layers, "evaluation": self.evaluation,
                "preprocessors": [{"name": n, **t.describe()} for n, t in self.transforms],
                "refine": self.refined, "exports": self.exported,
                "refine_choice": self.choice.decisions if hasattr(self, "choice") else [],
                "disk": getattr(self, "disk", None),
                "config": res.describe(), "plan": {n: s.to_dict() for n, s in plan.specs.items()},
                "plan_info": plan.info}

    def sizes(self) -> dict:
        """The checkpoint's tensor bytes next to the source model's."""
        ck = sum(p.stat().st_size for p in Path(self.final).glob("*.safetensors"))
        src = sum(p.stat().st_size for p in Path(self.folder).glob("*.safetensors"))
        return {"checkpoint_mb": round(ck / 2**20, 1), "source_mb": round(src / 2**20, 1),
                "size_ratio": round(ck / src, 4) if src else None}

    def refine_report(self, wall: float) -> dict:
        """The checkpoint's own report (the pivot's, or an earlier refine's) with this refine
        stage's records, times and evaluation added."""
        r = dict(self.base_report)
        summary = dict(r.get("summary", {}))
        kept = any(rec["kept"] for rec in self.refined)
        summary.update({"refiners": list(dict.fromkeys([*summary.get("refiners", []), *self.run_cfg.refiners])),
                        "stage": "refined" if kept or summary.get("stage") == "refined" else "pivot",
                        "wall_seconds": round(summary.get("wall_seconds", 0) + wall, 2),
                        "peak_rss_mb": round(max(summary.get("peak_rss_mb", 0), self.peak_quantize), 1),
                        "peak_gpu_mb": peak_gpu_mb()})
        if self.evaluation is not None or kept:
            summary["peak_rss_mb_with_eval"] = round(peak_rss_mb(), 1) if self.evaluation else None
            r["evaluation"] = self.evaluation        # an evaluation of the pivot no longer describes it
        r["summary"] = summary
        r["refine"] = [*r.get("refine", []), *[rec for rec in self.refined if rec not in r.get("refine", [])]]
        r["stages"] = {**r.get("stages", {}), **{k: v for k, v in self.stages.items() if k in ("refine", "evaluate")}}
        r["stage_memory"] = {**r.get("stage_memory", {}), **self.stage_memory}
        r["refine_choice"] = [*r.get("refine_choice", []), *(self.choice.decisions if hasattr(self, "choice") else [])]
        return r
