"""Exact least-squares updates of the envelope factors with the signs held fixed.

One side of the factorisation is X = S o (E F^T) (rows x k) with signs S, envelopes E (rows x l)
and F (k x l). Holding the other side fixed, both halves of W ~ L R^T reduce to the same
quadratic in X:

    f(X) = tr(X^T Dw X C) - 2 tr(X^T Dw N)       (Dw = diag(w): sum_i w_i (x_i C x_i^T - 2 x_i n_i^T))

    L side: C = R^T H R, N = W H R, w = 1        (f = ||(W - L R^T) H^1/2||^2 - const)
    R side: C = L^T L,   N = W^T L,  w = H       (the same error; a full Gram H couples the rows)

w is a vector (diagonal weights) or a full PSD matrix. f is quadratic in E for fixed F
(independent per row for a vector w, an l x l system each; one rows*l system for a matrix w)
and in F for fixed E (one kl x kl system), so each update is the exact minimiser and f never
increases.
"""
from __future__ import annotations

import torch


def weigh(w: torch.Tensor | None, X: torch.Tensor) -> torch.Tensor:
    """Dw X for w None (Dw = I), a vector (Dw = diag(w)) or a full rows x rows matrix; X has one
    row per weight, any trailing shape."""
    if w is None:
        return X
    if w.dim() == 1:
        return w.reshape(-1, *[1] * (X.dim() - 1)) * X
    return (w @ X.reshape(X.shape[0], -1)).reshape(X.shape)


def _solve_psd(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A x = b for (batched) positive semi-definite A, with a tiny relative ridge: by Cholesky
    (half the work of LU), by LU where the factorisation fails."""
    n = A.shape[-1]
    ridge = 1e-7 * torch.diagonal(A, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
    A = A + ridge[..., None, None] * torch.eye(n, dtype=A.dtype, device=A.device)
    L, info = torch.linalg.cholesky_ex(A)
    if bool((info == 0).all()):
        return torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1)
    return torch.linalg.solve(A, b.unsqueeze(-1)).squeeze(-1)


def update_rows(S: torch.Tensor, F: torch.Tensor, C: torch.Tensor, N: torch.Tensor,
                w: torch.Tensor | None = None, E: torch.Tensor | None = None, direct_max: int = 4096) -> torch.Tensor:
    """argmin_E f. Vector (or no) w: row i solves (M_i C M_i^T) e_i = M_i n_i with
    M_i = (S_i o F)^T (l x k), w_i cancels. Matrix w: K vec(E) = b with
    K[(i,t),(m,s)] = w_im (S_i o F_t) C (S_m o F_s)^T and b[(i,t)] = (S_i o F_t) . (w N)_i,
    solved directly up to ``direct_max`` unknowns, else by conjugate gradients from ``E``
    (whose iterates never raise f)."""
    SF = S[:, :, None] * F[None, :, :]                          # rows x k x l
    if w is None or w.dim() == 1:
        A = torch.einsum("ijt,jm,ims->its", SF, C, SF)          # rows x l x l
        b = torch.einsum("ij,ijt->it", N, SF)                   # rows x l
        return _solve_psd(A.double(), b.double()).to(F.dtype)
    rows, k, l = SF.shape
    if rows * l > direct_max:
        return _cg_rows(S, F, C, N, w, E if E is not None else torch.zeros(rows, l, dtype=F.dtype, device=F.device))
    M = SF.double().permute(0, 2, 1).reshape(rows * l, k)       # row (i, t): S_i o F_t
    wl = w.double().repeat_interleave(l, 0).repeat_interleave(l, 1)
    K = (M @ C.double() @ M.T) * wl
    b = (M * weigh(w.double(), N.double()).repeat_interleave(l, 0)).sum(1)
    return _solve_psd(K, b).reshape(rows, l).to(F.dtype)


def _cg_rows(S, F, C, N, w, E, iters: int = 30):
    """Conjugate gradients on the matrix-w rows system without forming K:
    K E = (S o (w (S o E F^T) C)) F  (f = tr(X^T w X C) - 2 tr(X^T w N), X = S o (E F^T))."""
    dtype = F.dtype
    S, F, C, N, w, E = (t.double() for t in (S, F, C, N, w, E))
    K = lambda E: (S * (w @ ((S * (E @ F.T)) @ C))) @ F
    b = (S * weigh(w, N)) @ F
    r = b - K(E)
    p, rr = r.clone(), float((r * r).sum())
    tol = 1e-20 * max(float((b * b).sum()), 1e-300)
    for _ in range(iters):
        if rr <= tol:
            break
        Kp = K(p)
        alpha = rr / max(float((p * Kp).sum()), 1e-300)
        E, r = E + alpha * p, r - alpha * Kp
        rr, rr_old = float((r * r).sum()), rr
        p = r + (rr / rr_old) * p
    return E.to(dtype)


def update_shared(S: torch.Tensor, E: torch.Tensor, C: torch.Tensor, N: torch.Tensor,
                  w: torch.Tensor | None = None) -> torch.Tensor:
    """argmin_F f: K vec(F) = b with K[(j,t),(m,s)] = C_jm sum_ip w_ip S_ij E_it S_pm E_ps and
    b[(j,t)] = sum_i S_ij E_it (w N)_ij (w a vector: w_ip = w_i on the diagonal; None: ones)."""
    rows, k = S.shape
    l = E.shape[1]
    SE = (S[:, :, None] * E[:, None, :]).double()               # rows x k x l: S_ij E_it
    wSE = weigh(None if w is None else w.double(), SE)
    K = torch.einsum("ijt,ims->jtms", wSE, SE) * C.double()[:, None, :, None]
    b = torch.einsum("ij,ijt->jt", N.double(), wSE)
    F = _solve_psd(K.reshape(k * l, k * l), b.reshape(-1))
    return F.reshape(k, l).to(E.dtype)


def objective(X: torch.Tensor, C: torch.Tensor, N: torch.Tensor, w: torch.Tensor | None = None) -> float:
    return float((weigh(w, X) * (X @ C - 2 * N)).sum())
