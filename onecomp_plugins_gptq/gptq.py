"""GPTQ: minimise ||W X - W^ X||^2 one column at a time, spreading each column's rounding error
over the columns not yet quantized through the inverse Hessian (H = X X^T / N).

Pure tensor math; see docs/algorithms.md. Notation: W (out x in), H (in x in), U the upper
Cholesky factor of H^-1.
"""
from __future__ import annotations

import torch

from onecomp_core.sdk import damp_hessian, grid, inverse_cholesky_upper


def prepare_hessian(H: torch.Tensor, W: torch.Tensor, damp: float):
    """Dead inputs (H_ii = 0) get H_ii = 1 and a zero weight column; then
    H <- H + damp * mean(diag H) * I."""
    H, dead = damp_hessian(H, damp)
    W = W.clone()
    W[:, dead] = 0
    return H, W


def gptq(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, symmetric: bool, *,
         damp: float = 0.01, block_size: int = 128, act_order: bool = False, static_groups: bool = True,
         fit_kwargs: dict | None = None, clip_weight: str = "none"):
    """-> codes (out, in) uint8, scale (out, G), zero (out, G) of the uniform grid.
    ``clip_weight="hessian"``: the clipping search weighs column j's error by H_jj (the output
    error that column alone would cause), instead of equally; ``"output"``: it minimises each
    group's output error e H_gg e^T (H_gg: the group's diagonal block of H; the whole H per channel)."""
    fit_kwargs = fit_kwargs or {}
    out, cols = W.shape
    W = W.float()
    Hd, W = prepare_hessian(H.to(W.device), W, damp)
    G = grid.num_groups(cols, group_size)
    gsize = cols if group_size == grid.PER_CHANNEL else group_size
    scale = torch.zeros(out, G, device=W.device)
    zero = torch.zeros(out, G, device=W.device)
    fitted = torch.zeros(G, dtype=torch.bool)
    d = torch.diag(Hd).to(W.dtype, copy=True) if clip_weight == "hessian" else None   # E_j = H_jj (w_j - w^_j)^2
    Hg = Hd.to(W.dtype, copy=True) if clip_weight == "output" else None               # E_g = e_g H_gg e_g^T
    if act_order and static_groups or group_size == grid.PER_CHANNEL:
        # static groups: parameters from the original weights, before any error feedback
        s, z = grid.fit_groups(W, bits, group_size, symmetric, weight=d, gram=Hg, **fit_kwargs)
        scale[:], zero[:], fitted[:] = s, z, True
    perm = torch.argsort(torch.diag(Hd), descending=True) if act_order else torch.arange(cols, device=W.device)
    if act_order:                 # natural order: no permuted copies of H (2 x in^2 floats)
        W = W[:, perm]
        Hd = Hd[perm][:, perm]
    U = inverse_cholesky_upper(Hd, damp).float()
    del Hd
    groups_of = grid.group_index(cols, group_size, W.device)[perm].tolist()   # group of each permuted column
    fitted = fitted.tolist()
    maxq = 2**bits - 1
    scale_t, zero_t = scale.t().contiguous(), zero.t().contiguous()        # a group's parameters contiguous
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1t = W[:, i1:i2].t().contiguous()                                # the block's columns as rows
        Err1 = torch.zeros(out, i2 - i1, device=W.device)
        for j in range(i2 - i1):
            col = i1 + j
            g = groups_of[col]
            if not fitted[g]:
                # dynamic groups (natural order): fit when the group starts, on the updated weights
                start = g * gsize
                span = torch.cat([W1t[j:].t(), W[:, i2:]], 1)[:, : min(gsize, cols - start)]
                end = start + span.shape[1]
                dg = None if d is None else d[start:end]
                hg = None if Hg is None else Hg[start:end, start:end][None]
                scale_t[g], zero_t[g] = grid.fit(span, bits, symmetric, weight=dg, gram=hg, **fit_kwargs)
                fitted[g] = True
            s, z = scale_t[g], zero_t[g]
            w = W1t[j]
            q = torch.div(w, s).round_().add_(z).clamp_(0, maxq)               # grid.quantize
            Q[:, col] = q
            e = q.sub_(z).mul_(s)                                             # grid.dequantize: w^_j
            e = torch.sub(w, e).div_(U[col, col])                             # e = (w_j - w^_j) / U_jj
            W1t[j:].addr_(U[col, col:i2], e, alpha=-1)                        # w_k -= e U_jk within the block
            Err1[:, j] = e
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]                                # lazy update of later columns
    scale, zero = scale_t.t(), zero_t.t()
    inv = torch.argsort(perm)
    return Q[:, inv].to(torch.uint8), scale, zero
