"""QEP: quantization error propagation (DESIGN.md section 2).

Layer l sees the quantized stream's input X^ instead of the FP input X. Aim at the FP output
from the perturbed input: minimise ||W X - W^ X^||^2. With H^ = X^ X^^T / N and the cross
term C = (X - X^) X^^T / N (both sums over calibration tokens, accumulated online),
    W_target = W + alpha W C (H^ + lam I)^-1          (the QEP correction; alpha = 1 is exact)
"""
from __future__ import annotations

import torch


class CrossAccumulator:
    """C = (X - X^) X^^T / N, from paired FP / quantized inputs of one linear."""

    def __init__(self, in_features: int, device):
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x_fp: torch.Tensor, x_q: torch.Tensor) -> None:
        a = x_fp.reshape(-1, x_fp.shape[-1]).float()
        b = x_q.reshape(-1, x_q.shape[-1]).float()
        self.sum.addmm_((a - b).t(), b)
        self.n += b.shape[0]

    @property
    def C(self) -> torch.Tensor:
        return self.sum / max(self.n, 1)


def qep_target(W: torch.Tensor, H: torch.Tensor, C: torch.Tensor, alpha: float, damp: float) -> torch.Tensor:
    """W + alpha W C (H + damp mean(diag H) I)^-1, by a Cholesky solve (H symmetric)."""
    Hd = H.double().clone()
    Hd.diagonal().add_(damp * float(torch.diagonal(Hd).mean()) + 1e-12)
    L, info = torch.linalg.cholesky_ex(Hd)
    if int(info) != 0:                     # not positive definite: leave the target alone
        return W
    WC = (W.double() @ C.double())          # out x in
    delta = torch.cholesky_solve(WC.t(), L).t()   # (H^-1 (W C)^T)^T = W C H^-1
    return (W.double() + alpha * delta).to(W.dtype)


class ResidualAccumulator:
    """R = (h - h^) X^^T / N: the residual-stream error at a writer's add (out x N) against
    the writer's quantized-stream input (in x N)."""

    def __init__(self, out_features: int, in_features: int, device):
        self.sum = torch.zeros(out_features, in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, r_fp: torch.Tensor, r_q: torch.Tensor, x_q: torch.Tensor) -> None:
        d = (r_fp - r_q).reshape(-1, r_fp.shape[-1]).float()
        x = x_q.reshape(-1, x_q.shape[-1]).float()
        self.sum.addmm_(d.t(), x)
        self.n += x.shape[0]

    @property
    def R(self) -> torch.Tensor:
        return self.sum / max(self.n, 1)


def lpcd_writer_target(W: torch.Tensor, H: torch.Tensor, C: torch.Tensor, R: torch.Tensor | None,
                       alpha: float, damp: float) -> torch.Tensor:
    """Relax a residual writer (o_proj, down_proj) to the FP submodule output plus the residual
    error at its add: argmin ||W X + (h - h^) - W' X^||^2 =
        W + (W C + R) (H^ + lam I)^-1            (alpha scales the correction)"""
    Hd = H.double().clone()
    Hd.diagonal().add_(damp * float(torch.diagonal(Hd).mean()) + 1e-12)
    L, info = torch.linalg.cholesky_ex(Hd)
    if int(info) != 0:
        return W
    G = W.double() @ C.double()
    if R is not None:
        G = G + R.double()
    delta = torch.cholesky_solve(G.t(), L).t()
    return (W.double() + alpha * delta).to(W.dtype)
