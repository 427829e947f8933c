"""Fusing a rotation of the residual stream into the weights: the pure math of ``hadamard``.

The stream x (d) becomes x' = R1^T x. RMSNorm without its weight commutes with any orthogonal
R1 (||R1^T x|| = ||x||), so once a norm's weight g (as c + w) is folded into its readers,
  readers   W <- W diag(g) R1           (W x_hat(x) g  =  W diag(g) R1 x_hat(x'))
  writers   W <- R1^T W,  b <- R1^T b   (their output is added to the stream)
  embedding E <- E R1                   (rows are the tokens' stream vectors)
  head      W <- W diag(g_final) R1.
Per attention head (width h), with one orthogonal R2:
  value rows  W_v[head] <- R2^T W_v[head] (bias likewise), output columns W_o[:, head] <- W_o[:, head] R2.
Arithmetic in float64, results cast back to each weight's dtype, in place.
"""
from __future__ import annotations

import torch

_ROWS = 8192          # rows per float64 chunk (a 49k-token embedding is not copied whole)


def _set(p: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        p.copy_(value.to(p.dtype))


def columns_times(W: torch.Tensor, M: torch.Tensor) -> None:
    """W <- W M, chunked over rows."""
    M = M.to(W.device)
    for i in range(0, W.shape[0], _ROWS):
        _set(W[i:i + _ROWS], W[i:i + _ROWS].double() @ M)


def rows_times(W: torch.Tensor, M: torch.Tensor) -> None:
    """W <- M W (W's rows index the stream)."""
    _set(W, M.to(W.device) @ W.double())


def fold_norm(norm_weight: torch.Tensor, offset: float, readers: list[torch.Tensor], R1: torch.Tensor) -> torch.Tensor:
    """W <- W diag(c + w) R1 for every reader, then w <- 1 - c (the norm's gain becomes 1); -> c + w."""
    g = offset + norm_weight.detach().double()
    M = g.to(R1.device)[:, None] * R1                  # diag(g) R1
    for W in readers:
        columns_times(W, M)
    _set(norm_weight, torch.full_like(g, 1.0 - offset))
    return g


def rotate_heads_rows(W: torch.Tensor, first: int, heads: int, R2: torch.Tensor) -> None:
    """Rows first + k h .. first + (k + 1) h of W (and of a bias vector) <- R2^T rows, k < heads."""
    h = R2.shape[0]
    R2t = R2.T.to(W.device)
    for k in range(heads):
        sl = slice(first + k * h, first + (k + 1) * h)
        _set(W[sl], R2t @ W[sl].double())


def rotate_heads_columns(W: torch.Tensor, R2: torch.Tensor) -> None:
    """Columns of each head of W (in = heads x h) <- W[:, head] R2."""
    h = R2.shape[0]
    R2 = R2.to(W.device)
    for k in range(W.shape[1] // h):
        sl = slice(k * h, (k + 1) * h)
        _set(W[:, sl], W[:, sl].double() @ R2)
