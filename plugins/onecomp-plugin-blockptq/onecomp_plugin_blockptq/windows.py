"""Phase 2 of block-wise PTQ: cross-block windows, on the finished pivot.

For each pair of adjacent blocks (i, i+1), in order from the input side:

    L(theta_i, theta_i+1) = mean ||B_i+1(B_i(h^_i)) - B_fp,i+1(B_fp,i(h_i))||^2   (two-block MSE)

trained with the same loop as Phase 1 (``reconstruct``), over the views of both blocks; h^_i is
the quantized stream entering block i (through every block before it as already refined), h_i
the FP stream. The pair keeps its update only when its error on held-out calibration samples
falls (else both blocks roll back). Then both streams advance through block i, whose views are
final. Every block but the first and last is trained in two windows.
"""
from __future__ import annotations

import torch

from onecomp_core.sdk import block_error, cast_floats, run_block

from .reconstruct import reconstruct, split_rows


def _out(y):
    return y[0] if isinstance(y, tuple) else y


class Pair(torch.nn.Module):
    """Blocks i and i+1 applied in turn, each with its own call arguments (masks may differ)."""

    def __init__(self, first, second, kw_first: dict, kw_second: dict):
        super().__init__()
        self.a, self.b = first, second
        self.kw = (kw_first, kw_second)

    def forward(self, x, **_):
        dtype = x.dtype
        y = _out(self.a(x, **cast_floats(self.kw[0], dtype)))
        return _out(self.b(y, **cast_floats(self.kw[1], dtype)))


class _Stop(Exception):
    pass


def capture(model, blocks, ids: torch.Tensor, device) -> tuple[torch.Tensor, list[dict]]:
    """-> (the hidden states entering block 0 for every sample (N, L, d), the keyword arguments
    each block is called with (from the first sample; position embeddings and masks depend only
    on the length))."""
    inputs, kwargs = [], [None] * len(blocks)

    def record(i):
        def hook(_module, args, kw):
            if i == 0:
                inputs.append((args[0] if args else kw["hidden_states"]).detach())
            if kwargs[i] is None:
                kwargs[i] = {k: v for k, v in kw.items() if k not in ("hidden_states", "past_key_values",
                                                                       "past_key_value")} | {"use_cache": False}
            elif i == 0:
                raise _Stop          # later samples: only the block-0 input is needed
        return hook

    handles = [b.register_forward_pre_hook(record(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            for row in ids:
                try:
                    model(input_ids=row[None].to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    return torch.cat(inputs, 0), kwargs


def params_of(views: dict) -> list[torch.nn.Parameter]:
    return [p for v in views.values() for ps in v.param_groups().values() for p in ps]


def refine_windows(teacher_blocks, student_blocks, block_views: list[dict], x_fp: torch.Tensor,
                   x_q: torch.Tensor, kwargs: list[dict], *, start: int = 0, on_window=None, epochs: int,
                   batch: int, lr: dict, train: dict, beta: float, tau0: float, tau1: float, clip: float,
                   heldout: float, seed: int, dtype=torch.float32) -> list[dict]:
    """Train the windows (start, start+1), ..., (n-2, n-1) in turn. ``block_views[i]``: relative
    module name -> view of block i (attached to ``student_blocks[i]``); ``x_fp``/``x_q``: the FP
    and quantized streams entering block ``start``. ``on_window(i, x_fp, x_q)`` is called after
    window i with the streams entering block i+1 (a resume point). -> one record per window."""
    records = []
    n = len(student_blocks)
    for i in range(start, n - 1):
        with torch.no_grad():
            y_fp = run_block(teacher_blocks[i], x_fp, kwargs[i])
            target = run_block(teacher_blocks[i + 1], y_fp, kwargs[i + 1])
        pair = Pair(student_blocks[i], student_blocks[i + 1], kwargs[i], kwargs[i + 1])
        views = {f"a.{r}": v for r, v in block_views[i].items()} | {f"b.{r}": v for r, v in block_views[i + 1].items()}
        train_rows, eval_rows = split_rows(x_q.shape[0], heldout, seed + i)
        before = block_error(pair, x_q, target, {}, eval_rows)
        snap = [p.detach().clone() for p in params_of(views)]
        history = reconstruct(pair, views, x_q, target, {}, train_rows, epochs=epochs, batch=batch, lr=lr,
                              train=train, beta=beta, tau0=tau0, tau1=tau1, clip=clip, seed=seed + i, dtype=dtype)
        after = block_error(pair, x_q, target, {}, eval_rows)
        kept = after < before
        if not kept:                       # the pair rolls back, both blocks
            with torch.no_grad():
                for p, s in zip(params_of(views), snap):
                    p.copy_(s)
        records.append({"window": [i, i + 1], "heldout_before": before, "heldout_after": after, "kept": kept,
                        "train_loss": [round(x, 8) for x in history]})
        with torch.no_grad():
            x_fp = y_fp
            x_q = run_block(student_blocks[i], x_q, kwargs[i])
        if on_window is not None:
            on_window(i, x_fp, x_q, records[-1])
    return records
