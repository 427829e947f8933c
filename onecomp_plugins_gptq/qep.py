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
