"""The refine stage: model refiners over a published checkpoint (the pivot).

The layer-wise pass publishes the pivot at ``DIR`` first, as a complete checkpoint. This stage
then works beside it, in ``DIR.onecomp-refine``: ``current`` starts as DIR's files (hard links)
and each model refiner, in config order, trains on ``current`` and returns new stored tensors
for the modules it changed. Those are written into a complete candidate checkpoint (``next``),
which replaces ``current`` only if the held-out metric, the mean per-token KL(P_FP ||
P_quantized) on calibration samples no refiner trains on, falls; else it is discarded and the
report says so. At the end the caller swaps ``current`` in for DIR, so DIR is at every moment
the pivot or a later kept stage. Every outcome is recorded in the work folder's state, so a
rerun after a kill skips the refiners already done (and a refiner may keep its own resume state
in its ``scratch`` folder).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

import attrs
from safetensors.torch import load_file

from .checkpoint import load_quantized, module_keys, stored_modules
from .contexts import ModelContext
from .distributed import map_tensors
from .errors import OnecompError
from .evaluate import evaluate
from .export import link_or_copy
from .lazy_weights import LazyWeights
from .reference_pass import measure_reference
from .report import peak_gpu_mb, peak_rss_mb
from .resources import release_memory
from .store import atomic_json, atomic_save_tensors

SUFFIX = ".onecomp-refine"


def heldout_kl(model, ref, ids) -> float:
    """Mean per-token KL(P_ref || P_model) over the held-out samples (one window each); ``ref``
    the FP model, or its ReferenceLogProbs over these windows (:func:`heldout_reference`)."""
    return float(evaluate(model, ids.reshape(-1), ref=ref, seq_len=ids.shape[1])["kl"])


def heldout_reference(reference: Path, ids, device, dtype, plugins):
    """The FP model's ReferenceLogProbs over the held-out samples, measured block by block, so
    judging a stage never needs the whole FP model resident (only a refiner that asks for it)."""
    return measure_reference(str(reference), ids.reshape(-1), seq_len=ids.shape[1], device=str(device),
                             dtype=dtype, plugins=plugins)


def link_tree(src: Path, dst: Path) -> None:
    """A copy of the checkpoint folder ``src`` whose files are hard links where possible (its
    files are never written in place: every write replaces a file whole)."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for p in src.iterdir():
        if p.is_file() and not (p.name.startswith(".") and ".tmp" in p.name):
            link_or_copy(p, tmp / p.name)
    os.replace(tmp, dst)


def write_candidate(current: Path, nxt: Path, refiner: str, result: Mapping, plan, formats) -> None:
    """``nxt`` = ``current`` with ``result``'s tensors in place. Each must be stored exactly as
    the module's format stores it (same keys, shapes and dtypes), else a one-line error. One
    file at a time: each module's stored form is made just before its file is written, so the
    stored forms of the whole model are never resident at once (measured on SmolLM2 at 4b: they
    were, and made the refine stage's peak ~860 MB higher)."""
    index = json.loads((current / "model.safetensors.index.json").read_text())["weight_map"]
    weights = LazyWeights(current)
    by_file: dict[str, list[str]] = {}               # where each module's tensors are stored now
    stored_keys: dict[str, list[str]] = {}
    for name in result:
        if name not in plan:
            raise OnecompError(f"model refiner {refiner!r} returned {name!r}, which is not a quantized module")
        stored_keys[name] = module_keys(weights.keys(), name)
        for f in dict.fromkeys(index[k] for k in stored_keys[name] if k in index) or [None]:
            by_file.setdefault(f, []).append(name)
    if None in by_file:                              # a module with no stored tensors: it cannot be replaced
        name = by_file[None][0]
        raise OnecompError(f"model refiner {refiner!r} returned {name!r}, which this checkpoint does not store "
                           f"as a quantized module")
    shutil.rmtree(nxt, ignore_errors=True)
    nxt.mkdir(parents=True)
    try:
        made: dict[str, dict] = {}                   # stored forms of modules that span several files
        for p in sorted(current.iterdir()):
            if not p.is_file():
                continue
            if p.name not in by_file:
                link_or_copy(p, nxt / p.name)
                continue
            tensors = load_file(str(p))
            for name in by_file[p.name]:
                stored = made.pop(name, None) or _stored_form(name, result[name], stored_keys[name], weights, index,
                                                              plan, formats, refiner)
                for k, t in stored.items():
                    if index[k] != p.name:
                        made.setdefault(name, {})[k] = t
                        continue
                    old = tensors[k]
                    if old.shape != t.shape or old.dtype != t.dtype:
                        raise OnecompError(f"model refiner {refiner!r} changed how {name} is stored ({k}: "
                                           f"{tuple(old.shape)} {old.dtype} -> {tuple(t.shape)} {t.dtype}); a "
                                           f"refiner must keep the module's format and bits")
                    tensors[k] = t.detach().cpu().contiguous()
            atomic_save_tensors(nxt / p.name, tensors, metadata={"format": "pt"})
            del tensors
            release_memory()         # the packing's mid-sized temporaries, else kept by the C heap
    except BaseException:
        shutil.rmtree(nxt, ignore_errors=True)
        raise


def _stored_form(name, qt, keys, weights, index, plan, formats, refiner) -> dict:
    """Module ``name``'s tensors as its format stores them, in the dtype its floats (``keys``, its
    tensors in the checkpoint now) are stored in; a key the checkpoint does not have is a changed
    format (one-line error)."""
    floats = [weights.dtype_of(k) for k in keys if weights.dtype_of(k).is_floating_point]
    dtype = floats[0] if floats else weights.dtype()
    stored = formats[plan[name].format].to_tensors(name, qt, dtype)
    for k in stored:
        if k not in index:
            raise OnecompError(f"model refiner {refiner!r} changed how {name} is stored (new tensor {k}); "
                               f"a refiner must keep the module's format and bits")
    return stored


def refine_work(out: Path) -> Path:
    """The refine stage's work folder beside the checkpoint folder ``out``."""
    out = Path(out)
    return out.with_name(out.name + SUFFIX)


class RefineStore:
    """The refine stage's work folder beside ``out``: ``current``, ``next``, the refiners'
    scratch folders and ``state.json`` (fingerprint, records, whether a kept ``next`` is
    still to be moved into place)."""

    def __init__(self, out: Path, fingerprint: str):
        self.out = Path(out)
        self.work = refine_work(self.out)
        self.fingerprint = fingerprint
        state = self._state()
        if state is not None and state.get("fingerprint") != fingerprint:
            shutil.rmtree(self.work)               # an interrupted refine of another config: start over

    @property
    def current(self) -> Path:
        return self.work / "current"

    @property
    def next(self) -> Path:
        return self.work / "next"

    def _state(self) -> dict | None:
        p = self.work / "state.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def _write(self, **fields) -> None:
        state = self._state() or {"fingerprint": self.fingerprint, "records": []}
        state.update(fields)
        atomic_json(self.work / "state.json", state)

    def open(self) -> list[dict]:
        """Finish what a kill interrupted and make sure ``current`` exists; -> the records so far."""
        self.work.mkdir(parents=True, exist_ok=True)
        state = self._state()
        if state and state.get("pending"):
            self._promote()
        elif self.next.exists():
            shutil.rmtree(self.next)               # a candidate nobody decided on
        if not self.current.exists():
            link_tree(self.out, self.current)
        for stale in self.current.glob(".*.tmp*"):        # a write a kill interrupted
            stale.unlink()
        if state is None:
            self._write()
        return self.records()

    def records(self) -> list[dict]:
        """The outcomes recorded so far (none before the first refiner finishes)."""
        return list((self._state() or {}).get("records", []))

    def record(self, record: dict) -> None:
        """One refiner's outcome; a kept one's candidate becomes ``current`` (the state says so
        first, so a kill in between finishes the move on the next ``open``)."""
        records = self.records() + [record]
        self._write(records=records, pending=bool(record["kept"]))
        if record["kept"]:
            self._promote()
        else:
            shutil.rmtree(self.next, ignore_errors=True)

    def _promote(self) -> None:
        if self.next.exists():
            old = self.work / "old"
            shutil.rmtree(old, ignore_errors=True)
            if self.current.exists():
                os.replace(self.current, old)
            os.replace(self.next, self.current)
            shutil.rmtree(old, ignore_errors=True)
        self._write(pending=False)

    def publish(self) -> None:
        """``current`` replaces ``out``; the work folder goes."""
        previous = self.work / "previous"
        os.replace(self.out, previous)
        os.replace(self.current, self.out)
        shutil.rmtree(self.work, ignore_errors=True)


def same_on_every_rank(ranks, refiner, result) -> None:
    """Data-parallel: a checksum of every tensor ``refiner`` returned, compared over the ranks."""
    if ranks is None or not ranks.active:
        return
    found: dict = {}
    for name in sorted(result or {}):
        map_tensors(result[name], lambda t, n=name: found.setdefault(f"{n}[{len(found)}]", t))
    ranks.check_same(f"refiner {refiner.name}", found)


def scope_of(refiner) -> str:
    """``model``, or ``block`` for a block refiner run over a finished checkpoint's blocks."""
    return getattr(refiner, "scope", "model")


def model_context(refiner, checkpoint: Path, scratch: Path, *, plan, formats, plugins, reference, load_reference,
                  train_ids, block_train_ids, heldout_ids, device, run, ranks=None) -> ModelContext:
    """What ``refiner`` sees of the checkpoint in ``checkpoint`` (block refiners train on
    ``block_train_ids`` when given, model refiners on ``train_ids``)."""
    ids = block_train_ids if block_train_ids is not None and scope_of(refiner) == "block" else train_ids
    return ModelContext(checkpoint=checkpoint, reference=reference, plan=plan, formats=formats,
                        calibration_ids=ids, heldout_ids=heldout_ids, device=device,
                        load=lambda folder=None: load_quantized(folder or checkpoint, str(device), run.dtype, plugins),
                        load_reference=load_reference, run=run,
                        quantized=lambda: stored_modules(checkpoint, plugins.registry), scratch=scratch, ranks=ranks)


def run_model_refiners(refiners, store: RefineStore | None, *, plan, formats, plugins, reference, load_reference,
                       heldout_ref, train_ids, heldout_ids, device, run, choose=None, ranks=None,
                       out: Path | None = None, block_train_ids=None) -> list[dict]:
    """Each model refiner in order on ``store.current``; -> one record per refiner.
    ``choose(refiner, mctx)``: whether it runs and why, ``{"run": bool, "reason": str}`` (the
    resource-adaptive choice; a skipped refiner's record keeps the reason as ``why``). ``load_reference()``:
    the FP model, for the refiners that ask for it; ``heldout_ref``: what judges each stage (the FP
    model's ReferenceLogProbs over ``heldout_ids``, or the model itself; None on other ranks).
    Model refiners train on ``train_ids``; block refiners over the checkpoint's blocks on
    ``block_train_ids`` (default ``train_ids``).

    Data-parallel (``ranks`` active, every refiner ``data_parallel``): rank 0 owns ``store``,
    decides (done before a kill, chosen or skipped), judges and writes; it tells the other ranks
    whether each refiner runs, and they (``store`` None, ``out`` the checkpoint folder, on storage
    every rank sees) train on their shards beside it and return no records."""
    leader = ranks is None or ranks.leader
    work = store.work if store is not None else refine_work(out)
    done = {(r["name"], r.get("scope", "model")): r for r in store.open()} if leader else {}

    def load(folder=None):
        return load_quantized(folder or work / "current", str(device), run.dtype, plugins)

    def scratch(refiner) -> Path:
        return work / f"refiner-{refiner.name}{'' if scope_of(refiner) == 'model' else '-' + scope_of(refiner)}"

    def context(refiner) -> ModelContext:
        return model_context(refiner, work / "current", scratch(refiner), plan=plan, formats=formats, plugins=plugins,
                             reference=reference, load_reference=load_reference, train_ids=train_ids,
                             block_train_ids=block_train_ids, heldout_ids=heldout_ids, device=device, run=run,
                             ranks=ranks)

    def tell(runs: bool) -> bool:             # the leader's decision, on every rank
        return ranks.broadcast(runs) if ranks is not None else runs

    records, before = [], None
    for refiner in refiners:
        if ranks is not None:
            ranks.where = f"refiner {refiner.name}"
        if not leader:
            if tell(None):
                if not (work / "current").is_dir():
                    raise OnecompError(f"rank {ranks.rank} cannot see {work / 'current'}, which rank 0 wrote: a "
                                       f"data-parallel {refiner.name} needs --out on storage every rank sees")
                same_on_every_rank(ranks, refiner, refiner.refine(context(refiner)))
            continue
        key = (refiner.name, scope_of(refiner))
        if key in done:
            tell(False)
            records.append(done[key])
            continue
        if before is None:
            before = heldout_kl(load(), heldout_ref, heldout_ids)
            release_memory()          # the judged model's pages, before the refiner's own peak
        t0 = time.time()
        mctx = context(refiner)
        # its probe runs here alone
        decision = choose(refiner, attrs.evolve(mctx, ranks=None)) if choose is not None else None
        if decision is not None and not decision["run"]:
            tell(False)
            record = {"name": refiner.name, "scope": key[1], "modules": 0, "before": before, "after": before,
                      "kept": False, "skipped": True, "why": decision["reason"], "seconds": round(time.time() - t0, 2)}
            store.record(record)
            records.append(record)
            continue
        tell(True)
        result = refiner.refine(mctx) or {}
        same_on_every_rank(ranks, refiner, result)
        record = {"name": refiner.name, "scope": key[1], "modules": len(result), "before": before, "after": before,
                  "kept": False, "train_samples": int(mctx.calibration_ids.shape[0]),
                  "heldout_samples": int(heldout_ids.shape[0])}
        if result:
            write_candidate(store.current, store.next, refiner.name, result, plan, formats)
            result = None             # on disk now: not resident beside the judged model (DBF: ~0.7 GB)
            release_memory()
            record["after"] = heldout_kl(load(store.next), heldout_ref, heldout_ids)
            release_memory()
            record["kept"] = record["after"] < before
        record["seconds"] = round(time.time() - t0, 2)
        record["peak_rss_mb"] = round(peak_rss_mb(), 1)     # of the process, up to the end of this refiner
        record["peak_gpu_mb"] = peak_gpu_mb()
        if ranks is not None and ranks.active:
            record["ranks"] = ranks.world
        store.record(record)
        shutil.rmtree(scratch(refiner), ignore_errors=True)
        if record["kept"]:
            before = record["after"]
        records.append(record)
    return records
