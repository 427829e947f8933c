"""Hidden-state streams at block boundaries and the per-block call arguments, captured by
running the model's outer part (embeddings, rotary, masks) with recorders in place of blocks."""
from __future__ import annotations

import torch
import torch.nn as nn


class _StandIn(nn.Module):
    """Takes a decoder block's place in the model's outer forward (embeddings, rotary, masks,
    final norm), keeping the attributes that forward reads of its blocks."""

    def __init__(self, original: nn.Module):
        super().__init__()
        for attr in ("attention_type", "is_sliding", "sliding_window"):
            if hasattr(original, attr):
                setattr(self, attr, getattr(original, attr))


class _Recorder(_StandIn):
    """Records the call arguments of block ``index`` (and the hidden states entering block 0)
    and passes its input on."""

    def __init__(self, index: int, sink: dict, original: nn.Module):
        super().__init__(original)
        self.index, self.sink = index, sink

    def forward(self, hidden_states, *args, **kwargs):
        self.sink.setdefault("kwargs", {}).setdefault(self.index, kwargs)
        if self.index == 0:
            self.sink.setdefault("inputs", []).append(hidden_states.detach())
        return hidden_states


class _Replay(_StandIn):
    """Returns ``self.output`` (hidden states computed block by block elsewhere) in place of
    its input when set, its input otherwise."""

    output: torch.Tensor | None = None

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states if self.output is None else self.output


class blocks_replaced:
    """``with blocks_replaced(sk, make) as stand_ins``: every block of the skeleton replaced by
    ``make(index, original)`` for the duration, the originals put back on exit."""

    def __init__(self, sk, make):
        self.sk, self.make = sk, make

    def __enter__(self) -> list[nn.Module]:
        self.originals = [self.sk.blocks[i] for i in range(len(self.sk.blocks))]
        for i, blk in enumerate(self.originals):
            self.sk.blocks[i] = self.make(i, blk)
        return [self.sk.blocks[i] for i in range(len(self.originals))]

    def __exit__(self, *exc):
        for i, blk in enumerate(self.originals):
            self.sk.blocks[i] = blk


def replaying(sk) -> blocks_replaced:
    """Blocks replaced by :class:`_Replay` stand-ins: the outer forward with given final hidden
    states (set ``stand_ins[0].output``), or with no block at all."""
    return blocks_replaced(sk, lambda i, blk: _Replay(blk))


def capture(sk, ids: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
    """-> (block-0 inputs (N, L, d), the keyword arguments every block is called with)."""
    sk.fill_outer()
    base = getattr(sk.model, sk.model.base_model_prefix)
    sink: dict = {}
    try:
        with blocks_replaced(sk, lambda i, blk: _Recorder(i, sink, blk)), torch.no_grad():
            for row in ids:
                base(input_ids=row[None].to(sk.device), use_cache=False)
    finally:
        for name, mod in sk.outer_modules():
            mod.to("meta")
    kwargs = []
    for i in range(len(sk.blocks)):
        kw = {k: v for k, v in sink["kwargs"][i].items() if k not in ("past_key_values", "past_key_value")}
        kw["use_cache"] = False
        kwargs.append(kw)
    return torch.cat(sink["inputs"], 0), kwargs


def cast_floats(obj, dtype):
    """Floating tensors in ``obj`` (nested tuples/lists/dicts, e.g. a block's call arguments)
    cast to ``dtype``; everything else as is."""
    if torch.is_tensor(obj):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(cast_floats(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: cast_floats(v, dtype) for k, v in obj.items()}
    return obj


def _output(y):
    return y[0] if isinstance(y, tuple) else y


def batches(n: int, size: int):
    """Consecutive slices of at most ``size`` of range(n)."""
    size = max(1, size)
    for b in range(0, n, size):
        yield slice(b, min(b + size, n))


class SpilledStreams:
    """The layer-wise pass's hidden-state streams in files (memory-mapped, so the OS pages them
    out): two buffers per stream, a block reading one while writing the other."""

    def __init__(self, folder, shape, dtype):
        import shutil
        from pathlib import Path
        self.folder = Path(folder)
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        self.shape, self.dtype = tuple(shape), dtype
        self.turn: dict = {}

    def out(self, kind: str) -> torch.Tensor:
        """The next output buffer of stream ``kind`` (never the one the block is reading)."""
        k = self.turn[kind] = 1 - self.turn.get(kind, 1)
        path = self.folder / f"{kind}-{k}.bin"
        numel = int(torch.Size(self.shape).numel())
        return torch.from_file(str(path), shared=True, size=numel, dtype=self.dtype).view(self.shape)

    def remove(self) -> None:
        import shutil
        shutil.rmtree(self.folder, ignore_errors=True)


def forward_precision(dtype: torch.dtype | None, device: torch.device):
    """A context in which block forwards autocast to ``dtype`` (bfloat16 on a CPU: linears and
    attention in bfloat16, the residual stream and norms in float32); a no-op for None."""
    import contextlib
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict, out: torch.Tensor | None = None,
              batch: int = 1) -> torch.Tensor:
    """The block applied to ``hidden`` (N, L, d), ``batch`` samples per forward."""
    out = torch.empty_like(hidden) if out is None else out
    with torch.no_grad():
        for sl in batches(hidden.shape[0], batch):
            out[sl] = _output(block(hidden[sl], **kwargs))
    return out


def block_error(block: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, kwargs: dict, rows=None,
                batch: int = 1) -> float:
    """Mean squared difference between the block on ``inputs`` and ``targets`` over the
    samples ``rows`` (all when None): the block-output objective of block-level refiners.
    Summed sample by sample, so the batch size does not change the result."""
    rows = list(range(inputs.shape[0]) if rows is None else rows)
    tot = 0.0
    with torch.no_grad():
        for sl in batches(len(rows), batch):
            idx = rows[sl]
            y = _output(block(inputs[idx], **kwargs)).float()
            for j, s in enumerate(idx):
                tot += float(((y[j:j + 1] - targets[s:s + 1].float()) ** 2).mean())
    return tot / max(len(rows), 1)
