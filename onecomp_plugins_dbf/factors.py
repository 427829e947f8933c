"""Binary-factor approximation of a weight matrix (docs/algorithms.md), pure tensor math.

    W ~ L R^T,   L = S_a o (A P^T)  (out x k),   R = S_b o (B G^T)  (in x k)

with sign matrices S_a, S_b in {-1, +1} and rank-l envelopes A (out x l), P (k x l),
B (in x l), G (k x l). l = 1 is DBF (W ~ diag(a) S_a diag(p g) S_b^T diag(b)); l > 1 is MDBF.
Fitted by: truncated SVD of W H^1/2 (rank k) -> signs of the factors, magnitudes by a rank-l
SVD of their absolute values (SVID); then alternating ADMM on L and R, activation-aware:
min ||(W - L R^T) H^1/2||^2 with H the input Gram matrix (full, as GPTQ's objective) or its
diagonal.
"""
from __future__ import annotations

import math

import torch

from .envelopes import update_rows, update_shared
from .sign_descent import sweep


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


class Metric:
    """The input weighting of the fit, ||(W - L R^T) H^1/2||^2 with H = Q diag(lam) Q^T:
    Q = None when H is diagonal (lam = its diagonal, the activation-aware DBF of the papers),
    else the eigenvectors of the full Gram (the objective GPTQ minimises)."""

    def __init__(self, lam: torch.Tensor, Q: torch.Tensor | None = None):
        self.lam, self.Q = lam, Q
        self.H = None if Q is None else (Q * lam[None, :]) @ Q.T

    @classmethod
    def of(cls, h: torch.Tensor | None, cols: int, device, damp: float = 0.01) -> "Metric":
        """h: None (plain Frobenius), the (in,) diagonal or the (in, in) Gram; scaled to mean 1
        (full Grams also get damp * I, as GPTQ's Hessian does)."""
        if h is None:
            return cls(torch.ones(cols, device=device))
        if h.dim() == 1:
            d = h.float().clamp_min(1e-12)
            return cls(d / d.mean())
        H = h.double() / h.diagonal().double().mean().clamp_min(1e-30)
        lam, Q = torch.linalg.eigh(H + damp * torch.eye(cols, dtype=H.dtype, device=H.device))
        return cls(lam.clamp_min(damp * 1e-3).float(), Q.float())

    def left(self, X: torch.Tensor) -> torch.Tensor:
        """H X for X with one row per input."""
        return self.lam[:, None] * X if self.Q is None else self.H @ X

    def error(self, W, L, R) -> float:
        E = W - L @ R.T
        return float((E * self.left(E.T).T).sum())

    def whiten(self, W: torch.Tensor) -> torch.Tensor:
        """W H^1/2 (in the eigenbasis: W Q diag(lam)^1/2)."""
        Wq = W if self.Q is None else W @ self.Q
        return Wq * self.lam.sqrt()[None, :]

    def unwhiten(self, V: torch.Tensor) -> torch.Tensor:
        """Q diag(lam)^-1/2 V: the factor R with R^T H^1/2 = V^T (H^1/2 as in whiten)."""
        V = V / self.lam.sqrt()[:, None]
        return V if self.Q is None else self.Q @ V

    def solve_r(self, G: torch.Tensor, rhs: torch.Tensor, rho: float) -> torch.Tensor:
        """R with H R G + rho R = rhs (G = L^T L, symmetric): diagonal in the eigenbases of H and G."""
        mu, QG = torch.linalg.eigh(G)
        X = rhs if self.Q is None else self.Q.T @ rhs
        X = (X @ QG) / (self.lam[:, None] * mu[None, :] + rho)
        X = X @ QG.T
        return X if self.Q is None else self.Q @ X


def weighted_error(W, L, R, d) -> float:
    """||(W - L R^T) H^1/2||^2 for d the diagonal of H or H itself."""
    E = W - L @ R.T
    HE = d[:, None].to(E) * E.T if d.dim() == 1 else d.to(E) @ E.T
    return float((E * HE.T).sum())


def fit(W: torch.Tensor, k: int, l: int, d: torch.Tensor | None = None, *, iters: int = 40, rho: float = 0.02,
        rho_end: float = 4.0, polish: int = 16, seed: int = 0, damp: float = 0.01, trace: list | None = None):
    """-> (S_a, A, P, S_b, B, G). ``d`` weights the inputs: None (plain Frobenius), the (in,)
    diagonal of the input Gram H, or the full (in, in) H (damped by ``damp``); either way it is
    scaled to mean diagonal 1. The ADMM penalty grows geometrically from ``rho`` to ``rho_end``
    over the iterations (both relative to the Gram scale): a small penalty lets the signs move
    early, a large one makes the iterates settle on the structure. ADMM iterates are not
    monotone; the best one is kept. Then up to ``polish`` rounds of exact descent from it
    (:func:`polish_round`: sign flips and least-squares envelopes, each step never worse),
    stopping early once a round gains less than 1e-4 of the error. ``trace`` receives the
    weighted error of the kept iterate after the SVID start, after every ADMM iteration and
    after every polish round, so it never increases."""
    torch.manual_seed(seed)
    W = W.float()
    out, cols = W.shape
    m = Metric.of(d, cols, W.device, damp)
    U, S, Vh = torch.linalg.svd(m.whiten(W), full_matrices=False)    # best rank k of W H^1/2
    r = torch.sqrt(S[:k])
    L0, R0 = U[:, :k] * r, Vh[:k].T * r
    if k > S.numel():   # more binary columns than the rank: start the extra ones small and random
        g = torch.Generator(device="cpu").manual_seed(seed)
        extra = k - S.numel()
        tiny = float(r[-1]) * 0.1 + 1e-8
        L0 = torch.cat([L0, tiny * torch.randn(out, extra, generator=g).to(W.device)], 1)
        R0 = torch.cat([R0, tiny * torch.randn(cols, extra, generator=g).to(W.device)], 1)
    return _admm(W, m, k, l, svid(L0, l), svid(m.unwhiten(R0), l), rho_schedule(rho, rho_end, iters),
                 polish, trace)


def rho_schedule(rho: float, rho_end: float, iters: int) -> list[float]:
    """rho_t = rho (rho_end / rho)^(t / (iters - 1)), t = 0 .. iters-1: geometric growth."""
    if iters <= 1:
        return [rho] * iters
    return [rho * (rho_end / rho) ** (t / (iters - 1)) for t in range(iters)]


def _admm(W, m: Metric, k, l, fl, fr, rhos, polish, trace):
    """Alternating ADMM from the structured start (fl, fr) with penalties ``rhos``, keeping the
    best iterate, then polish rounds: -> factors."""
    ZL, ZR = compose(*fl), compose(*fr)
    UL, UR = torch.zeros_like(ZL), torch.zeros_like(ZR)
    eye = torch.eye(k, device=W.device)
    best = (m.error(W, ZL, ZR), fl, fr)
    if trace is not None:
        trace.append(best[0])
    WH = m.left(W.T).T
    for rho in rhos:
        # L-step: L (R^T H R + rho I) = W H R + rho (Z_L - U_L), then project onto the structure
        gram = ZR.T @ m.left(ZR)
        rho_l = rho * float(torch.diagonal(gram).mean().clamp_min(1e-12))    # rho relative to the Gram scale
        L = torch.linalg.solve(gram + rho_l * eye, (WH @ ZR + rho_l * (ZL - UL)).T).T
        fl = svid(L + UL, l)
        ZL = compose(*fl)
        UL = UL + L - ZL
        # R-step: H R (L^T L) + rho R = H W^T L + rho (Z_R - U_R)  (a Sylvester equation)
        G = ZL.T @ ZL
        rho_r = rho * float(torch.diagonal(G).mean().clamp_min(1e-12))
        R = m.solve_r(G, WH.T @ ZL + rho_r * (ZR - UR), rho_r)
        fr = svid(R + UR, l)
        ZR = compose(*fr)
        UR = UR + R - ZR
        new = m.error(W, ZL, ZR)
        if not math.isfinite(new):     # diverged: go on from the best iterate with fresh duals
            _, fl, fr = best
            ZL, ZR = compose(*fl), compose(*fr)
            UL, UR = torch.zeros_like(ZL), torch.zeros_like(ZR)
        elif new < best[0]:
            best = (new, fl, fr)
        if trace is not None:
            trace.append(best[0])
    err, fl, fr = best
    for _ in range(polish):
        fl, fr, new = polish_round(W, m, fl, fr)
        if new > err:
            break
        gain, err, best = err - new, new, (new, fl, fr)
        if trace is not None:
            trace.append(err)
        if gain <= 1e-4 * err:          # converged: a further round would not be worth its time
            break
    _, (Sa, A, P), (Sb, B, G) = best
    return Sa, A, P, Sb, B, G


def polish_round(W, m: Metric, fl, fr):
    """One round of exact updates, each of which can only lower the weighted error: L-side sign
    flips (sign_descent.py), the L envelopes, R-side sign flips, the R envelopes (envelopes.py;
    a full H couples the rows of R): -> (fl, fr, weighted error)."""
    (Sa, A, P), (Sb, B, G) = fl, fr
    ZR = compose(Sb, B, G)
    HZR = m.left(ZR)
    C, N = ZR.T @ HZR, W @ HZR                                           # L side of envelopes.py
    Sa, _ = sweep(Sa, A @ P.T, C, N)
    A = update_rows(Sa, P, C, N)
    P = update_shared(Sa, A, C, N)
    ZL = compose(Sa, A, P)
    C, N = ZL.T @ ZL, W.T @ ZL                                           # R side, weights H
    w = m.lam if m.Q is None else m.H
    Sb, _ = sweep(Sb, B @ G.T, C, N, w)
    B = update_rows(Sb, G, C, N, w, B)
    G = update_shared(Sb, B, C, N, w)
    return (Sa, A, P), (Sb, B, G), m.error(W, ZL, compose(Sb, B, G))
