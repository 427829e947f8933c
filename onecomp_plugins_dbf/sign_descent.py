"""Exact descent over the signs of one side of W ~ L R^T, envelopes and the other side fixed.

One side is X = S o V (rows x k, V = E F^T its envelope) and, as in envelopes.py,

    f(X) = tr(X^T Dw X C) - 2 tr(X^T Dw N)

with Dw = I on the L side (C = R^T H R, N = W H R: one quadratic per row) and Dw = H on the
R side (C = L^T L, N = W^T L; a full Gram couples the rows). Flipping x_ij -> -x_ij
(d = -2 x_ij) changes f by  d g_ij + d^2 Dw_ii C_jj,  g = 2 Dw (X C - N) the gradient. A sweep
visits the columns j in turn and flips, in one step, every row of column j whose single flip
lowers f. With Dw = I (or diagonal: a row's weight does not change which of its flips lower
f) the rows are independent, so that step is exact. With a full Dw the
flips of one column interact through Dw: the step's exact change  d.g_j + C_jj d^T Dw d  is
computed and, while it is not negative, the step keeps only the better half of its flips. So
f never increases.
"""
from __future__ import annotations

import torch

from .envelopes import weigh


def sweep(S: torch.Tensor, V: torch.Tensor, C: torch.Tensor, N: torch.Tensor, w: torch.Tensor | None = None,
          sweeps: int = 1) -> tuple[torch.Tensor, int]:
    """``sweeps`` passes of sign flips over the columns (w as in envelopes.py: None or a vector
    for independent rows, a full rows x rows matrix for coupled ones): -> (new signs, flips
    made)."""
    w = w if w is not None and w.dim() == 2 else None                # diagonal weights cancel per row
    S = S.clone()
    X = S * V
    XC = weigh(w, X @ C)                                              # Dw X C
    DN = weigh(w, N)                                                  # Dw N
    dw = torch.ones_like(X[:, 0]) if w is None else w.diagonal()
    flips = 0
    for _ in range(sweeps):
        made = 0
        for j in range(S.shape[1]):
            d = -2 * X[:, j]
            g = 2 * (XC[:, j] - DN[:, j])                                  # gradient of f in column j
            single = d * g + d * d * dw * C[j, j]                          # change of f per single flip
            got = _accepted(single < -1e-12 * (single.abs().max() + 1e-30), single, d, g, C[j, j], w)
            if got is None:
                continue
            idx, wdx = got
            dx = d[idx]
            X[idx, j] += dx
            S[idx, j] = -S[idx, j]
            if w is None:                                                  # only the flipped rows of X C move
                XC[idx] += dx[:, None] * C[j][None, :]
            else:                                                          # Dw X C moves by (Dw dx) C_j
                XC += wdx[:, None] * C[j][None, :]
            made += idx.numel()
        flips += made
        if made == 0:
            break
    return S, flips


def _accepted(flip, single, d, g, cjj, w, tries: int = 6):
    """The rows of one column whose flips lower f together: -> (their indices, Dw dx over all
    rows; None for independent rows) or None."""
    for _ in range(tries):
        idx = flip.nonzero().squeeze(1)
        if idx.numel() == 0:
            return None
        if w is None:                                                   # independent rows: exact
            return idx, None
        dx = d[idx]
        wdx = dx @ w[idx]                                               # Dw dx, reused for the X C update
        if float(dx @ g[idx] + cjj * (wdx[idx] @ dx)) < 0:               # the step's exact change of f
            return idx, wdx
        flip = flip & (single <= single[flip].median())                  # keep the better half
    return None
