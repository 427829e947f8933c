"""Binary-factor approximation of a weight matrix (DESIGN.md section 2), pure tensor math.

    W ~ L R^T,   L = S_a o (A P^T)  (out x k),   R = S_b o (B G^T)  (in x k)

with sign matrices S_a, S_b in {-1, +1} and rank-l envelopes A (out x l), P (k x l),
B (in x l), G (k x l). l = 1 is DBF (W ~ diag(a) S_a diag(p g) S_b^T diag(b)); l > 1 is MDBF.
Fitted by: truncated SVD of W (rank k) -> signs of the factors, magnitudes by a rank-l SVD of
their absolute values (SVID); then alternating ADMM on L and R, weighted by the diagonal d of
the input Gram matrix H (activation-aware):  min ||(W - L R^T) diag(d)^1/2||^2.
"""
from __future__ import annotations

import math

import torch


def sign(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


def svid(M: torch.Tensor, l: int):
    """|M| ~ E F^T of rank l: -> (sign(M), E, F)."""
    U, S, Vh = torch.linalg.svd(M.abs(), full_matrices=False)
    r = torch.sqrt(S[:l])
    E, F = U[:, :l] * r, Vh[:l].T * r
    if l == 1 and E.sum() < 0:        # the Perron vector: make the rank-1 envelope positive
        E, F = -E, -F
    return sign(M), E, F


def compose(S: torch.Tensor, E: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    return S * (E @ F.T)


def project(M: torch.Tensor, l: int) -> torch.Tensor:
    """The nearest structured factor S o (E F^T) (signs of M, rank-l envelope of |M|)."""
    return compose(*svid(M, l))


def rank_for_bpw(out: int, cols: int, bpw: float, l: int, meta_bits: int = 16) -> int:
    """Largest k whose storage k (out + in) sign bits + 16 l (out + in + 2k) envelope bits
    fits bpw * out * in."""
    k = math.floor((bpw * out * cols - meta_bits * l * (out + cols)) / (out + cols + 2 * meta_bits * l))
    return max(k, 0)


def bits_per_weight(out: int, cols: int, k: int, l: int, meta_bits: int = 16) -> float:
    return (k * (out + cols) + meta_bits * l * (out + cols + 2 * k)) / (out * cols)


def weighted_error(W, L, R, d) -> float:
    E = W - L @ R.T
    return float(((E * E) * d[None, :]).sum())


def fit(W: torch.Tensor, k: int, l: int, d: torch.Tensor | None = None, *, iters: int = 40, rho: float = 0.6,
        seed: int = 0, trace: list | None = None):
    """-> (S_a, A, P, S_b, B, G). ``d`` (in,) weights the columns (None: plain Frobenius).
    ``trace`` receives the weighted error of the kept iterate after the SVID start and after
    every ADMM iteration. An iteration that would raise the error is rejected and rho doubled,
    so the kept objective never increases."""
    torch.manual_seed(seed)
    W = W.float()
    out, cols = W.shape
    d = torch.ones(cols, device=W.device) if d is None else d.float().clamp_min(1e-12)
    d = d / d.mean()
    U, S, Vh = torch.linalg.svd(W * d.sqrt()[None, :], full_matrices=False)
    r = torch.sqrt(S[:k])
    fl = svid(U[:, :k] * r, l)
    fr = svid((Vh[:k].T * r) / d.sqrt()[:, None], l)
    ZL, ZR = compose(*fl), compose(*fr)
    UL, UR = torch.zeros_like(ZL), torch.zeros_like(ZR)
    eye = torch.eye(k, device=W.device)
    err = weighted_error(W, ZL, ZR, d)
    best = (err, fl, fr)
    if trace is not None:
        trace.append(err)
    WD = W * d[None, :]
    state = (ZL, ZR, UL, UR, fl, fr)
    for _ in range(iters):
        ZL, ZR, UL, UR, fl, fr = state
        # L-step: L (R^T D R + rho I) = W D R + rho (Z_L - U_L), then project onto the structure
        gram = (ZR * d[:, None]).T @ ZR
        rho_l = rho * float(torch.diagonal(gram).mean().clamp_min(1e-12))    # rho relative to the Gram scale
        L = torch.linalg.solve(gram + rho_l * eye, (WD @ ZR + rho_l * (ZL - UL)).T).T
        fl = svid(L + UL, l)
        ZL2 = compose(*fl)
        UL2 = UL + L - ZL2
        # R-step, row j: (d_j L^T L + rho I) r_j = d_j L^T w_j + rho (z_j - u_j), via eigh(L^T L)
        lam, Q = torch.linalg.eigh(ZL2.T @ ZL2)
        rho_r = rho * float(lam.mean().clamp_min(1e-12))
        rhs = (d[:, None] * (W.T @ ZL2)) + rho_r * (ZR - UR)
        R = ((rhs @ Q) / (d[:, None] * lam[None, :] + rho_r)) @ Q.T
        fr = svid(R + UR, l)
        ZR2 = compose(*fr)
        UR2 = UR + R - ZR2
        new = weighted_error(W, ZL2, ZR2, d)
        if new <= err:                 # accept: the kept objective never increases
            err, state = new, (ZL2, ZR2, UL2, UR2, fl, fr)
            best = (err, fl, fr)
        else:                          # reject the step and make the next one more conservative
            rho *= 2
        if trace is not None:
            trace.append(err)
    _, (Sa, A, P), (Sb, B, G) = best
    return Sa, A, P, Sb, B, G
