"""Exact least-squares updates of the envelope factors with the signs held fixed.

One side of the factorisation is X = S o (E F^T) (rows x k) with signs S, envelopes E (rows x l)
and F (k x l). Holding the other side fixed, both halves of W ~ L R^T reduce to the same
quadratic in X:

    f(X) = sum_i w_i (x_i C x_i^T - 2 x_i n_i^T)

    L side: C = R^T D R, N = W D R, w = 1        (f = ||(W - L R^T) D^1/2||^2 - const)
    R side: C = L^T L,   N = W^T L,  w = d       (the same error summed over input columns)

f is quadratic in E for fixed F (independent per row, an l x l system each) and in F for
fixed E (one kl x kl system), so each update is the exact minimiser and f never increases.
"""
from __future__ import annotations

import torch


def _solve_psd(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A x = b for (batched) positive semi-definite A, with a tiny relative ridge."""
    n = A.shape[-1]
    ridge = 1e-7 * torch.diagonal(A, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
    eye = torch.eye(n, dtype=A.dtype, device=A.device)
    return torch.linalg.solve(A + ridge[..., None, None] * eye, b.unsqueeze(-1)).squeeze(-1)


def update_rows(S: torch.Tensor, F: torch.Tensor, C: torch.Tensor, N: torch.Tensor) -> torch.Tensor:
    """argmin_E f: row i solves (M_i C M_i^T) e_i = M_i n_i with M_i = (S_i o F)^T (l x k)."""
    SF = S[:, :, None] * F[None, :, :]                          # rows x k x l
    A = torch.einsum("ijt,jm,ims->its", SF, C, SF)              # rows x l x l
    b = torch.einsum("ij,ijt->it", N, SF)                       # rows x l
    return _solve_psd(A.double(), b.double()).to(F.dtype)


def update_shared(S: torch.Tensor, E: torch.Tensor, C: torch.Tensor, N: torch.Tensor,
                  w: torch.Tensor) -> torch.Tensor:
    """argmin_F f: K vec(F) = b with K[(j,t),(m,s)] = C_jm sum_i w_i S_ij S_im E_it E_is and
    b[(j,t)] = sum_i w_i S_ij E_it N_ij."""
    rows, k = S.shape
    l = E.shape[1]
    SE = S[:, :, None] * E[:, None, :]                          # rows x k x l: S_ij E_it
    K = torch.einsum("ijt,ims->jtms", SE * w[:, None, None], SE) * C[:, None, :, None]
    b = torch.einsum("ij,ijt->jt", N * w[:, None], SE)
    F = _solve_psd(K.reshape(k * l, k * l).double(), b.reshape(-1).double())
    return F.reshape(k, l).to(E.dtype)


def objective(X: torch.Tensor, C: torch.Tensor, N: torch.Tensor, w: torch.Tensor) -> float:
    return float((w * (((X @ C) * X).sum(1) - 2 * (X * N).sum(1))).sum())
