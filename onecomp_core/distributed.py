"""Data-parallel runs over torch.distributed (gloo on CPUs, NCCL on GPUs, launched by torchrun).

    torchrun --nproc-per-node N -m onecomp_core quantize MODEL --out DIR ...

Every rank opens the model, builds the same calibration samples and the same plan (the leader,
rank 0, plans; the others receive its plan). The layer-wise pass then shards the calibration
samples: rank r holds a contiguous slice of both hidden-state streams and runs only its slice
through each block. The statistics are sums over tokens (:mod:`onecomp_core.stats`), so the
ranks' partial sums are all-reduced into the single-process statistics; each linear is then
projected once, by an owner rank (longest-processing-time assignment over the whole pass), and
its quantized tensor broadcast to the others. Only the leader writes: it gathers the streams
to commit each block (so a re-run resumes exactly as a one-process run does), exports,
evaluates and runs the model refiners.

:class:`Ranks` is this process's view of the run; with one process every collective is the
identity, so the pass has one code path.
"""
from __future__ import annotations

import atexit
import contextlib
import copy
import datetime
import os

import attrs
import torch

from .errors import OnecompError

DEFAULT_TIMEOUT_S = 1800      # a collective waits this long for a rank before the run ends


def launched_world() -> int:
    """The number of processes torchrun (or the environment) launched this run with."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise OnecompError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; launch with torchrun") from None


def shard_bounds(n: int, world: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) of ``n`` samples for each of ``world`` ranks, sizes differing by
    at most one (the first ``n % world`` ranks take one more)."""
    base, extra = divmod(n, world)
    out, start = [], 0
    for r in range(world):
        stop = start + base + (1 if r < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def assign_owners(costs: dict[str, float], load: list[float]) -> dict[str, int]:
    """Each item to the least-loaded rank, largest first (LPT); ``load`` (per rank) is updated,
    so successive calls balance the whole pass. Ties go to the lower rank: every rank computes
    the same assignment."""
    owners = {}
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        r = min(range(len(load)), key=lambda k: (load[k], k))
        owners[name] = r
        load[r] += costs[name]
    return owners


def map_tensors(obj, fn):
    """``obj`` with every tensor in it (nested dicts, lists, tuples, attrs instances) replaced by
    ``fn(tensor)``; other values as they are."""
    if torch.is_tensor(obj):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    if attrs.has(type(obj)):
        new = copy.copy(obj)
        for f in attrs.fields(type(obj)):
            object.__setattr__(new, f.name, map_tensors(getattr(obj, f.name), fn))
        return new
    return obj


class Ranks:
    """One process's place in a data-parallel run and the collectives the run uses."""

    def __init__(self, rank: int = 0, world: int = 1, objects=None):
        self.rank, self.world = rank, world
        self._objects = objects            # a gloo group for pickled objects and CPU tensors
        self.load = [0.0] * world          # projection work given to each rank so far
        self.where = "the start"           # what the run was doing, for the error when a rank is lost

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, n: int) -> slice:
        """This rank's samples of ``n``."""
        return slice(*shard_bounds(n, self.world)[self.rank])

    @contextlib.contextmanager
    def _guard(self):
        try:
            yield
        except RuntimeError as exc:           # torch.distributed's errors (DistError, gloo, NCCL) are RuntimeErrors
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise OnecompError(f"rank {self.rank} of {self.world} lost the other ranks during {self.where} "
                               f"({first}); the finished blocks are kept: run the same command again to resume") from None

    def all_reduce_stats(self, stats: dict) -> None:
        """Sum every rank's statistics (``{module: {kind: Statistic}}``) in place: each becomes the
        statistic of all ranks' samples together."""
        if not self.active:
            return
        import torch.distributed as dist
        items = [stats[m][k] for m in sorted(stats) for k in sorted(stats[m])]
        with self._guard():
            for s in items:
                dist.all_reduce(s.sum)
            if items:
                counts = torch.tensor([s.n for s in items], dtype=torch.float64, device=items[0].sum.device)
                dist.all_reduce(counts)
                for s, n in zip(items, counts.tolist()):
                    s.n = int(n)

    def mean_over_ranks(self, mean: float, count: int) -> float:
        """The mean over every rank's items from this rank's ``mean`` of ``count`` items."""
        if not self.active:
            return mean
        import torch.distributed as dist
        t = torch.tensor([mean * count, float(count)], dtype=torch.float64)
        with self._guard():
            dist.all_reduce(t, group=self._objects)
        return float(t[0] / t[1].clamp_min(1))

    def max_int(self, k: int) -> int:
        if not self.active:
            return k
        import torch.distributed as dist
        t = torch.tensor([k], dtype=torch.int64)
        with self._guard():
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._objects)
        return int(t)

    def average_gradients(self, params, bucket_bytes: int = 64 << 20) -> None:
        """Each parameter's ``.grad`` replaced by its mean over the ranks (a missing one counts as
        0), as DistributedDataParallel averages: gradients flattened into buckets of up to
        ``bucket_bytes`` per dtype and device, one all-reduce per bucket."""
        if not self.active:
            return
        import torch.distributed as dist
        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        buckets: dict = {}                  # (dtype, device) -> [[grads], ...]
        filled: dict = {}                   # (dtype, device) -> bytes in its last bucket
        for g in grads:
            key, size = (g.dtype, g.device), g.numel() * g.element_size()
            if key not in buckets or (buckets[key][-1] and filled[key] + size > bucket_bytes):
                buckets.setdefault(key, []).append([])
                filled[key] = 0
            buckets[key][-1].append(g)
            filled[key] += size
        with self._guard():
            for group in (b for bs in buckets.values() for b in bs):
                flat = torch.cat([g.reshape(-1) for g in group])
                dist.all_reduce(flat)
                flat /= self.world
                for g, part in zip(group, flat.split([g.numel() for g in group])):
                    g.copy_(part.view_as(g))

    def check_same(self, where: str, tensors: dict) -> None:
        """Every rank holds the same ``tensors`` (a block's weights after its refiners): a cheap
        checksum compared over the ranks; a difference is a bug in a data-parallel component."""
        if not self.active or not tensors:
            return
        import torch.distributed as dist
        sums = torch.stack([t.detach().double().sum() for t in tensors.values()]).cpu()
        lo, hi = sums.clone(), sums.clone()
        with self._guard():
            dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=self._objects)
            dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=self._objects)
        bad = [n for n, a, b in zip(tensors, lo.tolist(), hi.tolist()) if a != b]
        if bad:
            raise OnecompError(f"data-parallel ranks hold different weights for {bad[0]} after {where} "
                               f"(a component that is not data-parallel-safe); run in one process")

    def broadcast(self, obj, src: int = 0):
        """``obj`` as rank ``src`` has it, on every rank (tensors arrive on the CPU)."""
        if not self.active:
            return obj
        import torch.distributed as dist
        box = [map_tensors(obj, lambda t: t.detach().cpu()) if self.rank == src else None]
        with self._guard():
            dist.broadcast_object_list(box, src=src, group=self._objects)
        return box[0]

    def leader_does(self, fn, share: bool = True):
        """Run ``fn`` on the leader only; its OnecompError is raised on every rank. -> its result,
        on every rank when ``share``, else on the leader (None elsewhere)."""
        if not self.active:
            return fn()
        result, error = None, None
        if self.leader:
            try:
                result = fn()
            except OnecompError as exc:
                error = str(exc)
        shared, error = self.broadcast((result if share else None, error))
        if error is not None:
            raise OnecompError(error)
        return shared if share else result

    def gather_rows(self, t: torch.Tensor, n: int) -> torch.Tensor | None:
        """The ranks' row shards (of :meth:`shard`) of one ``n``-row tensor, concatenated in rank
        order, on the leader (None elsewhere): the whole tensor as one process would hold it."""
        if not self.active:
            return t
        import torch.distributed as dist
        sizes = [b - a for a, b in shard_bounds(n, self.world)]
        widest = max(sizes)
        part = t.detach().cpu()
        if part.shape[0] < widest:
            part = torch.cat([part, part.new_zeros((widest - part.shape[0], *part.shape[1:]))])
        full = None
        if self.leader:      # the shards land in row slices of one buffer: no copies besides it
            full = torch.empty((widest * self.world, *part.shape[1:]), dtype=part.dtype)
        with self._guard():
            dist.gather(part, list(full.split(widest)) if self.leader else None, dst=0, group=self._objects)
        if not self.leader:
            return None
        if widest * self.world == n:
            return full
        return torch.cat([full[r * widest:r * widest + k] for r, k in enumerate(sizes)])      # drop the padding

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist
            with self._guard():
                dist.barrier(group=self._objects)


def start_ranks(device: str = "auto") -> Ranks:
    """This process's :class:`Ranks`: one process unless torchrun (WORLD_SIZE > 1) launched it,
    then the process group is joined here (NCCL when the run uses CUDA, else gloo; objects and
    streams always travel over a gloo group)."""
    world = launched_world()
    if world <= 1:
        return Ranks()
    import torch.distributed as dist
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise OnecompError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch with "
                           f"torchrun --nproc-per-node {world} -m onecomp_core quantize ...")
    timeout = datetime.timedelta(seconds=float(os.environ.get("ONECOMP_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():                # once per process; later runs in it reuse the group
        try:
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
        except RuntimeError as exc:
            raise OnecompError(f"could not join the {world}-process run at {os.environ['MASTER_ADDR']}:"
                               f"{os.environ['MASTER_PORT']} ({str(exc).strip().splitlines()[0]}); "
                               f"check that every rank was started with the same torchrun command") from None
        atexit.register(_leave)
    global _OBJECTS
    if cuda and _OBJECTS is None:
        _OBJECTS = dist.new_group(backend="gloo", timeout=timeout)
    return Ranks(dist.get_rank(), dist.get_world_size(), _OBJECTS if cuda else None)


_OBJECTS = None     # the gloo group for objects beside an NCCL default group


def _leave() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: torch.device) -> torch.device:
    """On CUDA with several processes, each rank takes the GPU of its local rank."""
    if device.type == "cuda" and launched_world() > 1 and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device
