"""The layer-wise pass: block by block, two hidden-state streams (full precision and quantized),
statistics, corrections, projection in dependency order, block refiners, commit.

For each block: the FP block runs on the FP stream (the block's target); each group of linears
that share an input (q/k/v -> o -> gate/up -> down) is quantized in turn on the quantized stream
(:meth:`BlockContext.quantize_group`), block refiners may act before each group and after the
last; then the quantized block runs on the quantized stream and the block is committed.
When nothing in the run reads the streams (no statistics, layer corrections or block refiners:
e.g. RTN), no block runs on calibration data at all: each block is only projected and committed.
The pass itself knows nothing about repeated passes or roll-backs: block refiners do those
through the :class:`BlockContext`.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import time

import torch

from .contexts import LayerContext
from .distributed import Ranks, assign_owners, map_tensors
from .gather import gather_group
from .replay import Replays
from .report import rss_mb
from .resources import release_memory
from .skeleton import as_stored
from .streams import block_error, forward_precision, run_block


def relative_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor | None) -> float:
    """||(W - W^) X||^2 / ||W X||^2 = tr(dW H dW^T) / tr(W H W^T) (Frobenius when H is None)."""
    d = W - Wq
    if H is None:
        return float((d * d).sum() / (W * W).sum().clamp_min(1e-30))
    return float(((d @ H) * d).sum() / ((W @ H) * W).sum().clamp_min(1e-30))


class BlockContext:
    """One decoder block during the layer-wise pass: what block refiners see and can do.

    ``groups``: the block's linears to quantize (relative names), grouped by shared input, in
    execution order. ``qts``/``info``: the quantized tensor and report entry of each linear
    quantized so far (full names). ``q_inputs``: the quantized stream entering the block;
    ``fp_outputs``: the FP block's output on the FP stream, the block's target."""

    def __init__(self, lw: "LayerwisePass", index: int, block, fp_inputs, q_inputs, fp_outputs, kwargs):
        sk = lw.sk
        self._lw = lw
        self.index = index
        self.prefix = sk.block_prefix(index)
        self.block = block
        groups = [[n for n in g if f"{self.prefix}.{n}" in lw.plan] for g in sk.adapter.linear_groups(block)]
        self.groups: list[list[str]] = [g for g in groups if g]
        self.fp_inputs, self.q_inputs, self.fp_outputs, self.kwargs = fp_inputs, q_inputs, fp_outputs, kwargs
        self.taps = sk.adapter.residual_taps(block)        # residual writer -> module reading the stream at its add
        self.residual_writers = frozenset(self.taps)
        self.submodules = sk.adapter.submodules(block)
        self.quantized: set[str] = set()
        self.qts: dict = {}
        self.info: dict = {}
        self.batch = lw.batch
        # FP copy of the block: paired FP-stream inputs for cross/residual statistics, FP weights to restore
        self._fp_block = copy.deepcopy(block) if lw.paired or lw.keep_fp else None
        # submodules whose output stops changing once their linears are final (the attention)
        self.replays, self._fp_replays = Replays(), Replays()
        self._settling = {m: [n for n in self.linears if n.startswith(m + ".")]
                          for m in sk.adapter.replayable(block)} if lw.replay else {}
        self._projections = {m: sk.adapter.output_projection(block, m) for m in self._settling}
        if self._fp_block is not None and lw.replay:            # the FP copy never changes
            for m in self._settling:
                self._fp_replays.add(self._fp_block.get_submodule(m))
        self._settle()

    def _settle(self) -> None:
        """Replay every replayable submodule whose linears are all quantized now, and the input
        of the output projection of one whose other linears are."""
        for m, names in list(self._settling.items()):
            if self.quantized.issuperset(names):
                self.replays.add(self.block.get_submodule(m))
                del self._settling[m]
                continue
            proj = self._projections.get(m)
            if proj in names and proj not in self.quantized and self.quantized.issuperset(set(names) - {proj}):
                self.replays.add_projection(self.block.get_submodule(m), self.block.get_submodule(proj))

    @contextlib.contextmanager
    def rounds(self):
        """The context of one round of forwards of this block over all its calibration samples."""
        n = -(-self.q_inputs.shape[0] // max(1, self.batch))
        with self.replays.round(n), self._fp_replays.round(n):
            yield

    @property
    def linears(self) -> list[str]:
        return [n for g in self.groups for n in g]

    def full(self, rel: str) -> str:
        return f"{self.prefix}.{rel}"

    def module(self, rel: str) -> torch.nn.Module:
        return self.block.get_submodule(rel)

    def spec(self, rel: str):
        """The :class:`LayerSpec` the plan gives the linear ``rel``."""
        return self._lw.plan[self.full(rel)]

    def format(self, rel: str):
        """The format instance the linear ``rel`` is stored in."""
        return self._lw.formats[self.spec(rel).format]

    def set_quantized(self, rel: str, qt, **info) -> None:
        """Replace the quantized tensor of ``rel`` (same format and bits, e.g. a trainable
        view's ``write_back()``): the live weight becomes its dequantized value, ``info`` is
        merged into the layer's report entry."""
        name = self.full(rel)
        self._load_weight(rel, qt)
        self.qts[name] = qt
        self.info[name] = {**self.info.get(name, {}), **info}

    def _load_weight(self, rel: str, qt) -> None:
        """The live weight of ``rel`` becomes ``qt``'s dequantized value."""
        lin = self.module(rel)
        with torch.no_grad():
            lin.weight.copy_(qt.dequantize(torch.float32).to(lin.weight.dtype))

    def fp_weight(self, rel: str) -> torch.Tensor:
        """The linear's weight before anything in this pass changed it."""
        if self._fp_block is None:
            raise RuntimeError("FP weights were not kept: set needs_fp_weights = True on the block refiner")
        return self._fp_block.get_submodule(rel).weight.detach()

    def error(self, rows=None) -> float:
        """Mean squared difference of the block (as it is now) on the quantized stream from the FP
        block's output, over the calibration samples ``rows`` (all when None) of this rank's
        shard; in a data-parallel run the mean over every rank's ``rows``."""
        rows = list(range(self.q_inputs.shape[0])) if rows is None else list(rows)
        with self._lw.forwards(stream=True):
            err = block_error(self.block, self.q_inputs, self.fp_outputs, self.kwargs, rows, batch=self.batch)
        return self._lw.ranks.mean_over_ranks(err, len(rows))

    def sync_gradients(self, params) -> None:
        """Average the gradients of ``params`` over the ranks (data-parallel training; a no-op in
        one process), so every rank takes the same optimizer step."""
        self._lw.ranks.average_gradients(params)

    def max_over_ranks(self, k: int) -> int:
        """The largest ``k`` any rank has (e.g. steps per epoch: every rank must run as many)."""
        return self._lw.ranks.max_int(k)

    def restore_fp(self, names) -> None:
        """Put the FP weights of ``names`` (relative) back into the live block."""
        with torch.no_grad():
            for n in names:
                self.module(n).weight.copy_(self.fp_weight(n))

    def snapshot(self, names) -> dict:
        """The live weights, quantized tensors and report entries of ``names``, to ``restore``."""
        return {n: (self.module(n).weight.detach().clone(), self.qts.get(self.full(n)),
                    dict(self.info.get(self.full(n), {}))) for n in names}

    def restore(self, snap: dict, rejected: bool = True) -> None:
        """Go back to a snapshot; ``rejected`` marks the layers' report entries (``pass_rejected``)."""
        with torch.no_grad():
            for n, (w, qt, inf) in snap.items():
                self.module(n).weight.copy_(w)
                self.qts[self.full(n)] = qt
                self.info[self.full(n)] = {**inf, "pass_rejected": True} if rejected else inf

    def quantize_group(self, group: list[str], pass_index: int = 0) -> None:
        """Quantize the linears ``group`` (relative names) from their live weights: gather the
        statistics the run needs on the quantized stream (the block as it is now), let the
        corrections set each target, project, let them post-process, write the dequantized
        weights into the block."""
        lw = self._lw
        mods = {n: self.module(n) for n in group}
        with lw.forwards(), self.rounds():
            stats = gather_group(self.block, mods, self.q_inputs, self.kwargs, lw.needs, lw.batch,
                                 fp_block=self._fp_block, fp=self.fp_inputs, taps=self.taps, dtype=lw.stats_dtype)
        ranks = lw.ranks
        ranks.where = f"block {self.index}"
        ranks.all_reduce_stats(stats)                    # data-parallel: every rank's samples summed
        for per in stats.values():                       # components read float32 sums
            for st in per.values():
                st.sum = st.sum.float()
        # each linear projected once, by its owner rank (cost ~ GPTQ's out x in^2 + in^3)
        owners = assign_owners({rel: m.out_features * m.in_features ** 2 + m.in_features ** 3
                                for rel, m in mods.items()}, ranks.load) if ranks.active else dict.fromkeys(mods, 0)
        mine = {rel: lw.quantize_linear(self.full(rel), lin, self.block, stats[rel], pass_index)
                for rel, lin in mods.items() if owners[rel] == ranks.rank}
        for rel, lin in mods.items():
            name = self.full(rel)
            qt, info = ranks.broadcast(mine.get(rel), src=owners[rel])
            if rel not in mine:                          # another rank's projection: its result here too
                qt = map_tensors(qt, lambda t: t.to(lin.weight.device))
                self._load_weight(rel, qt)
            self.qts[name], self.info[name] = qt, info
            lw.hook.onecomp_layer_done(block=self.index, name=name, info=info)
        self.quantized.update(group)
        self._settle()

    def release(self) -> None:
        self._fp_replays.remove()
        self._fp_block = None


def streams_used(needs, corrections, block_refiners) -> tuple[bool, bool]:
    """(data-free: nothing reads the streams, the blocks never run on calibration data;
    the FP stream is computed: paired statistics (cross, residual) and block refiners read it, the
    FP block's output being their target)."""
    data_free = not needs and not corrections and not block_refiners
    return data_free, bool({"cross", "residual"} & set(needs)) or bool(block_refiners)


class LayerwisePass:
    def __init__(self, sk, plan, projectors, formats, corrections, block_refiners, store, hook,
                 needs: set, batch: int = 1, spill=None, ranks: Ranks | None = None,
                 stats_dtype: torch.dtype = torch.float32, forward_dtype: torch.dtype | None = None,
                 stream_autocast: bool = True):
        self.sk, self.plan, self.projectors, self.formats = sk, plan, projectors, formats
        self.forward_dtype = forward_dtype                # autocast of the statistics forwards (None: none)
        # ... and of the stream forwards; with block refiners the streams are their inputs and targets,
        # computed in the compute dtype (as `onecomp refine` on a saved pivot computes them)
        self.stream_autocast = stream_autocast and not block_refiners
        self.ranks = ranks or Ranks()                     # data-parallel: this rank holds a shard of the samples
        self.stats_dtype = stats_dtype
        self.corrections, self.block_refiners, self.store, self.hook = corrections, block_refiners, store, hook
        self.needs, self.batch = set(needs), batch
        self.spill = spill                                # SpilledStreams: outputs go to files on disk
        self.paired = bool({"cross", "residual"} & self.needs)
        self.keep_fp = any(r.needs_fp_weights for r in block_refiners)
        self.data_free, self.fp_stream = streams_used(self.needs, corrections, block_refiners)
        # replay settled submodules' outputs: not when block refiners may change any weight at any
        # time, nor when memory is short (streams on disk), nor where the q stream's forward runs in
        # another precision than the statistics forwards that recorded them
        self.replay = not block_refiners and spill is None and (forward_dtype is None or stream_autocast)

    def run(self, fp: torch.Tensor, q: torch.Tensor, kwargs: list[dict], start: int, samples: int | None = None,
            stop: int | None = None) -> dict:
        """Blocks ``start``..``stop`` - 1 (default: to the last) on the streams ``fp``, ``q`` (this
        rank's shard of ``samples`` rows)."""
        # the objects alive before the pass (imported libraries, the skeleton) are left out of the
        # per-block collection: a full collection over them cost 0.26 s a block on SmolLM2
        gc.freeze()
        try:
            return self._run(fp, q, kwargs, start, samples, stop)
        finally:
            gc.unfreeze()

    def _run(self, fp, q, kwargs, start, samples, stop) -> dict:
        sk = self.sk
        samples = fp.shape[0] if samples is None else samples
        total = len(sk.blocks)
        per_block_s, per_block_rss = [], []
        for i in range(start, total if stop is None else min(stop, total)):
            t0 = time.time()
            block = sk.block(i)
            if self.fp_stream and not self.data_free:
                with self.forwards(stream=True):
                    fp_next = run_block(block, fp, kwargs[i], out=self._out("fp"), batch=self.batch)  # FP block, FP stream
            else:
                fp_next = fp[:0]                                                        # nothing reads it
            bctx = BlockContext(self, i, block, fp, q, fp_next, kwargs[i])
            self.hook.onecomp_block_start(index=i, total=total, layers=bctx.linears)
            for group in bctx.groups:
                for r in self.block_refiners:
                    r.before_group(bctx, group)
                bctx.quantize_group(group)
            for r in self.block_refiners:
                r.refine_block(bctx)
            if self.block_refiners:
                self.ranks.check_same(f"block {i}'s refiners", {n: bctx.module(n).weight for n in bctx.linears})
            bctx.release()
            with self.forwards(stream=True), bctx.rounds():
                q_next = q if self.data_free else run_block(block, q, kwargs[i], out=self._out("q"),
                                                            batch=self.batch)           # quantized block
            bctx.replays.remove()
            fp, q = fp_next, q_next
            tensors = self._block_tensors(block, bctx.prefix, bctx.qts)
            streams = {k: v if v.shape[0] == 0 else self.ranks.gather_rows(v, samples)
                       for k, v in (("fp", fp), ("q", q[:0] if self.data_free else q))}
            self.store.commit_block(i, tensors, streams, bctx.info)     # a no-op store on ranks other than 0
            sk.release_block(i)
            del block, bctx, tensors, streams
            release_memory()        # glibc keeps a released block's freed pages: without this RSS creeps up per block
            per_block_s.append(time.time() - t0)
            per_block_rss.append(round(rss_mb(), 1))
            self.hook.onecomp_block_done(index=i, total=total, info={"seconds": per_block_s[-1]})
        return {"block_seconds": per_block_s, "block_rss_mb": per_block_rss, "calibration_forwards": not self.data_free}

    def forwards(self, stream: bool = False):
        """The precision of the pass's own block forwards: the statistics forwards, and with
        ``stream_autocast`` both streams too (never with block refiners, which train in the
        compute dtype against the FP stream and read the block error in it)."""
        return forward_precision(None if stream and not self.stream_autocast else self.forward_dtype, self.sk.device)

    def _out(self, kind: str):
        return self.spill.out(kind) if self.spill is not None else None

    def quantize_linear(self, name, lin, block, stats: dict, pass_index: int = 0):
        spec = self.plan[name]
        fmt = self.formats[spec.format]
        W = lin.weight.detach().float().clone()
        if not torch.isfinite(W).all():
            from .errors import OnecompError
            raise OnecompError(f"{name}.weight has {int((~torch.isfinite(W)).sum())} non-finite values as the pass "
                               f"reaches it (after the transforms); repair the checkpoint or --exclude {name}")
        gram = stats.get("gram")
        H = gram.H if gram is not None else None
        ctx = LayerContext(name=name, spec=spec, weight=W, target=W, H=H, stats=stats, module=lin,
                           block=block, fmt=fmt, pass_index=pass_index)
        t0 = time.time()
        for c in self.corrections:
            ctx.target = c.adjust_target(ctx)
        qt = self.projectors[spec.projector].project(ctx.target, H, spec, fmt)
        for c in self.corrections:
            qt = c.after_projection(ctx, qt)
        Wq = qt.dequantize(torch.float32)
        with torch.no_grad():
            lin.weight.copy_(Wq.to(lin.weight.dtype))
        return qt, {"rel_error": relative_error(W, Wq, H), "seconds": time.time() - t0,
                    "bits": spec.bits, "group_size": spec.group_size, "projector": spec.projector,
                    "format": spec.format, "shape": list(W.shape), "bpw": fmt.stored_bits_per_weight(spec, tuple(W.shape), qt),
                    "pass": pass_index + 1, **fmt.structure(qt)}

    def _block_tensors(self, block, prefix, qts) -> dict:
        """The block as saved: quantized linears in their format's layout, the rest as is."""
        dtype = self.sk.store_dtype
        out = {}
        for name, qt in qts.items():
            spec = self.plan[name]
            out.update(self.formats[spec.format].to_tensors(name, qt, dtype))
        for pname, t in block.state_dict().items():
            full = f"{prefix}.{pname}"
            owner = full.rsplit(".", 1)[0]
            if owner in qts and full.endswith(".weight"):
                continue
            out[full] = as_stored(t, dtype)
        return out
