"""Sinkhorn balancing: W = diag(r) W' diag(c) with W' rows and columns of (nearly) equal norm,
found by alternately normalising rows and columns. The factorisation is fitted to W' and the
two scale vectors are folded into the envelopes (rows of A by r, rows of B by c)."""
from __future__ import annotations

import torch


def balance(W: torch.Tensor, p: int = 2, iters: int = 10, eps: float = 1e-8):
    """-> (W', r, c) with W = diag(r) W' diag(c); p = 1 or 2 picks the norm being equalised."""
    Wb = W.float().clone()
    r = torch.ones(W.shape[0], device=W.device)
    c = torch.ones(W.shape[1], device=W.device)
    for _ in range(iters):
        rn = Wb.abs().pow(p).mean(1).pow(1 / p).clamp_min(eps)
        Wb /= rn[:, None]
        r *= rn
        cn = Wb.abs().pow(p).mean(0).pow(1 / p).clamp_min(eps)
        Wb /= cn[None, :]
        c *= cn
    return Wb, r, c
