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

from .envelopes import update_rows, update_shared


def sign(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


def top_singular(M: torch.Tensor, l: int, iters: int = 8):
    """The top-l singular triplets of M by block power (subspace) iteration: -> (U, S, V)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    V = torch.randn(M.shape[1], l, generator=g).to(M)
    V = V + M.abs().mean(0, keepdim=True).T          # start near the Perron vector of |M|
    for _ in range(iters):
        U, _ = torch.linalg.qr(M @ V)
        V, _ = torch.linalg.qr(M.T @ U)
    B = U.T @ M @ V                                    # l x l: finish with an exact small SVD
    u, s, vh = torch.linalg.svd(B)
    return U @ u, s, V @ vh.T


def svid(M: torch.Tensor, l: int):
    """|M| ~ E F^T of rank l: -> (sign(M), E, F)."""
    U, S, V = top_singular(M.abs(), l)
    r = torch.sqrt(S[:l])
    E, F = U[:, :l] * r, V[:, :l] * r
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
        polish: int = 4, seed: int = 0, trace: list | None = None):
    """-> (S_a, A, P, S_b, B, G). ``d`` (in,) weights the columns (None: plain Frobenius).
    ``trace`` receives the weighted error of the kept iterate after the SVID start, after
    every ADMM iteration and after every polish round. An ADMM iteration that would raise the
    error is rejected and rho doubled; polish rounds are exact least-squares updates of the
    envelopes with the signs fixed (envelopes.py). The kept objective never increases."""
    torch.manual_seed(seed)
    W = W.float()
    out, cols = W.shape
    d = torch.ones(cols, device=W.device) if d is None else d.float().clamp_min(1e-12)
    d = d / d.mean()
    U, S, Vh = torch.linalg.svd(W * d.sqrt()[None, :], full_matrices=False)
    r = torch.sqrt(S[:k])
    L0, R0 = U[:, :k] * r, Vh[:k].T * r
    if k > S.numel():   # more binary columns than the rank: start the extra ones small and random
        g = torch.Generator(device="cpu").manual_seed(seed)
        extra = k - S.numel()
        tiny = float(r[-1]) * 0.1 + 1e-8
        L0 = torch.cat([L0, tiny * torch.randn(out, extra, generator=g).to(W.device)], 1)
        R0 = torch.cat([R0, tiny * torch.randn(cols, extra, generator=g).to(W.device)], 1)
    return _admm(W, d, k, l, svid(L0, l), svid(R0 / d.sqrt()[:, None], l), iters, rho, polish, trace)


def _admm(W, d, k, l, fl, fr, iters, rho, polish, trace):
    """Alternating ADMM from the structured start (fl, fr), then envelope polish: -> factors."""
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
        if not math.isfinite(new):     # diverged: restart from the best iterate, more conservative
            _, fl, fr = best
            state, rho = (compose(*fl), compose(*fr), torch.zeros_like(UL), torch.zeros_like(UR), fl, fr), rho * 2
        elif new <= err:               # accept: the kept objective never increases
            err, state = new, (ZL2, ZR2, UL2, UR2, fl, fr)
            best = (err, fl, fr)
        else:                          # reject the step and make the next one more conservative
            rho *= 2
        if trace is not None:
            trace.append(err)
    err, fl, fr = best
    for _ in range(polish):
        fl, fr, new = polish_envelopes(W, d, fl, fr)
        if new > err:
            break
        err, best = new, (new, fl, fr)
        if trace is not None:
            trace.append(err)
    _, (Sa, A, P), (Sb, B, G) = best
    return Sa, A, P, Sb, B, G


def polish_envelopes(W, d, fl, fr):
    """One round of exact envelope updates, L side then R side: -> (fl, fr, weighted error)."""
    (Sa, A, P), (Sb, B, G) = fl, fr
    ZR = compose(Sb, B, G)
    C, N = (ZR * d[:, None]).T @ ZR, (W * d[None, :]) @ ZR               # L side of envelopes.py
    ones = torch.ones(W.shape[0], device=W.device)
    A = update_rows(Sa, P, C, N)
    P = update_shared(Sa, A, C, N, ones)
    ZL = compose(Sa, A, P)
    C, N = ZL.T @ ZL, W.T @ ZL                                            # R side, weights d
    B = update_rows(Sb, G, C, N)
    G = update_shared(Sb, B, C, N, d)
    return (Sa, A, P), (Sb, B, G), weighted_error(W, ZL, compose(Sb, B, G), d)
