"""Disk space: what a run writes beside and into ``--out`` at its peak, checked against the free
space there before the first block (and said by a dry run), and the one-line error a full disk
gets mid-run (finished blocks are kept; the same command resumes)."""
from __future__ import annotations

import errno
import shutil
from pathlib import Path

import torch

from .errors import OnecompError
from .resources import human_bytes

SLACK = 64 * 2**20         # reports, configs, the tokenizer's files, a state file or two


def checkpoint_bytes(plan, formats, shapes, weights, store_dtype: torch.dtype, in_blocks) -> tuple[int, int]:
    """(the saved checkpoint, the part of it the blocks hold): Σ_m bpw_m·|W_m|/8 over the planned
    modules, plus every other tensor of the source (embeddings, norms, biases, an untied head) in
    ``store_dtype``; ``in_blocks(key)``: whether a source tensor lies in a block."""
    quantized = sum(formats[s.format].bits_per_weight(s, shapes[n]) * shapes[n][0] * shapes[n][1] / 8
                    for n, s in plan.specs.items())
    planned = {n + ".weight" for n in plan.specs}
    width = torch.finfo(store_dtype).bits // 8
    rest = [(weights.numel(k) * width, in_blocks(k)) for k in weights.keys() if k not in planned]
    return int(quantized + sum(b for b, _ in rest)), int(quantized + sum(b for b, inside in rest if inside))


def run_need(checkpoint: int, blocks: int, streams_file: int, spilled: int, refiners: bool) -> int:
    """Peak bytes a run adds to the disk: the block files still to write (``blocks``), the
    assembled checkpoint beside them until it is published, the streams file between blocks
    twice (the next one is written before the last is deleted), the spilled streams' buffers, and
    with model refiners one candidate checkpoint (``current`` is hard links to the pivot)."""
    return int(blocks + checkpoint + 2 * streams_file + spilled + (checkpoint if refiners else 0) + SLACK)


def free_bytes(path: Path) -> tuple[Path, int]:
    """(the nearest existing folder at or above ``path``, the free bytes on its file system)."""
    path = Path(path).absolute()
    where = next(p for p in (path, *path.parents) if p.exists())
    return where, shutil.disk_usage(where).free


def check_disk(need: int, out: Path) -> None:
    where, free = free_bytes(out)
    if need > free:
        raise OnecompError(f"the run needs ~{human_bytes(need)} of disk for {out} and its work folder, and "
                           f"{where} has {human_bytes(free)} free: free some space or choose --out on a larger disk")


def disk_full(exc: BaseException) -> bool:
    """A write that failed because the disk (or the quota) is full, as Python, safetensors or
    torch's archive writer report it."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text
