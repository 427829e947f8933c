"""JointQ: joint local search over integer codes and group scales, started from GPTQ.

For each row r minimise f_r = (w_r - w^_r) H' (w_r - w^_r)^T with H' = H + lam mean(diag H) I
(lam > 0 is the proximity regulariser lam ||w - w^||^2). Moves, vectorised over rows:
  * codes: sweep the columns; for column j try q_rj +- 1: with e = w - w^ and g = e H',
      delta f = -2 d s_j g_j + s_j^2 H'_jj  (d = +-1 in weight units of s_j);
    apply the best move where it lowers f, update e and g incrementally;
  * scales: with the codes fixed, the best scale of group G of row r is closed form,
      s* = u^T H' (e + s u) / (u^T H' u),  u = (q - z) on G's columns,
    rounded to the format's 16-bit float and kept only where f goes down.
Stop when a round changes nothing or after ``max_rounds``. Every accepted move lowers f, so
the result is never worse than the start.
"""
from __future__ import annotations

import torch

from onecomp_core.sdk import grid


def objective(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    e = W - Wq
    return ((e @ H) * e).sum(1)


def regularised(H: torch.Tensor, lam: float) -> torch.Tensor:
    return H + lam * float(torch.diagonal(H).mean()) * torch.eye(H.shape[0], device=H.device, dtype=H.dtype)


def _code_sweep(W, Q, S, Z, H, maxq) -> int:
    """One pass over the columns; returns the number of codes changed. Q, S (per column
    scale), Z (per column zero) are (out, in) and updated in place."""
    E = W - S * (Q - Z)
    Gr = E @ H                               # g = e H'
    diag = torch.diagonal(H)
    changed = 0
    for j in range(W.shape[1]):
        s, g, h = S[:, j], Gr[:, j], diag[j]
        best = torch.zeros_like(s)
        best_gain = torch.zeros_like(s)
        for d in (1.0, -1.0):
            ok = (Q[:, j] + d >= 0) & (Q[:, j] + d <= maxq)
            # w^ moves by d s, so e moves by -d s: delta f = -2 d s g + s^2 h
            df = -2 * d * s * g + s * s * h
            take = ok & (df < best_gain)
            best = torch.where(take, torch.full_like(s, d), best)
            best_gain = torch.where(take, df, best_gain)
        moved = best != 0
        if moved.any():
            Q[:, j] += best
            de = -best * s                   # change of e in column j
            Gr += de[:, None] * H[j][None, :]
            changed += int(moved.sum())
    return changed


def _scale_refit(W, Q, scale, zero, H, bits, group_size, scale_dtype) -> int:
    """Closed-form best scale per (row, group), kept where it lowers f. Returns #changes."""
    out, cols = W.shape
    gidx = grid.group_index(cols, group_size, W.device)
    changed = 0
    for g in range(scale.shape[1]):
        S = grid.expand(scale, cols, group_size)
        Zc = grid.expand(zero, cols, group_size)
        E = W - S * (Q - Zc)
        f0 = ((E @ H) * E).sum(1)
        mask = (gidx == g).float()
        U = (Q - Zc) * mask                  # u: the group's integer offsets
        UH = U @ H
        den = (UH * U).sum(1)
        num = (UH * (E + scale[:, g:g + 1] * U)).sum(1)
        s_new = torch.where(den > 0, num / den.clamp_min(1e-30), scale[:, g])
        s_new = s_new.clamp_min(torch.finfo(scale_dtype).tiny).to(scale_dtype).float()
        E_new = E + (scale[:, g] - s_new)[:, None] * U
        f1 = ((E_new @ H) * E_new).sum(1)
        better = f1 < f0
        scale[:, g] = torch.where(better, s_new, scale[:, g])
        changed += int(better.sum())
    return changed


def jointq(W: torch.Tensor, H: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
           bits: int, group_size: int, *, lam: float = 0.0, max_rounds: int = 3,
           scale_dtype=torch.float16):
    """Improve (codes, scale, zero) from a starting solution; -> the same triple."""
    W = W.float()
    Hr = regularised(H.float().to(W.device), lam)
    start = (codes.float(), scale.float(), zero.float())
    Q = codes.float().clone()
    scale = scale.float().clone()
    zero = zero.float().clone()
    cols = W.shape[1]
    maxq = 2**bits - 1
    for _ in range(max_rounds):
        S = grid.expand(scale, cols, group_size)
        Z = grid.expand(zero, cols, group_size)
        moved = _code_sweep(W, Q, S, Z, Hr, maxq)
        moved += _scale_refit(W, Q, scale, zero, Hr, bits, group_size, scale_dtype)
        if moved == 0:
            break
    # guard against float drift in the incremental updates: a row never ends worse than it began
    f_start = objective(W, _dense(*start, group_size), Hr)
    f_end = objective(W, _dense(Q, scale, zero, group_size), Hr)
    worse = f_end > f_start
    if worse.any():
        Q[worse], scale[worse], zero[worse] = start[0][worse], start[1][worse], start[2][worse]
    return Q.to(torch.uint8), scale, zero


def _dense(Q, scale, zero, group_size):
    cols = Q.shape[1]
    return grid.dequantize(Q, grid.expand(scale, cols, group_size), grid.expand(zero, cols, group_size))
