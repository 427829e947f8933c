"""Least-squares output rescaling: the pure math, apart from the plugin glue.

After a row w^_r = s_r * (q_r - z_r) is quantized, its layer error against the target t_r is
    e(a) = (t_r - a w^_r) H (t_r - a w^_r)^T,
a quadratic in one scalar a whose minimiser is
    a* = (t_r H w^_r^T) / (w^_r H w^_r^T).
Multiplying every scale of the row by a* keeps the codes and the format and never increases
e (a = 1 is the starting point) before the scales are rounded back to 16 bits.
"""
from __future__ import annotations

import torch


def row_factors(target: torch.Tensor, wq: torch.Tensor, H: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """a*_r for every row, clamped to [lo, hi]; 1 where the row is all zero."""
    wqH = wq @ H
    num = (target * wqH).sum(1)
    den = (wq * wqH).sum(1)
    a = torch.where(den > 0, num / den.clamp_min(1e-30), torch.ones_like(den))
    return a.clamp(lo, hi)


def layer_error(target: torch.Tensor, wq: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Per-row e = (t - w^) H (t - w^)^T."""
    d = target - wq
    return ((d @ H) * d).sum(1)
