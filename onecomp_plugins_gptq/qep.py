"""QEP: quantization error propagation (DESIGN.md section 2).

Layer l sees the quantized stream's input X^ instead of the FP input X. Aim at the FP output
from the perturbed input: minimise ||W X - W^ X^||^2. With H^ = X^ X^^T / N and the cross
term C = (X - X^) X^^T / N (both sums over calibration tokens, accumulated online),
    W_target = W + alpha W C (H^ + lam I)^-1          (the QEP correction; alpha = 1 is exact)
"""
from __future__ import annotations

import torch

from onecomp_core.stats import OuterSum


class CrossAccumulator(OuterSum):
    """C = (X - X^) X^^T / N, from paired FP / quantized inputs of one linear."""

    def __init__(self, in_features: int, device):
        super().__init__(in_features, in_features, device)

    def add(self, x_fp: torch.Tensor, x_q: torch.Tensor) -> None:
        self.add_outer(x_fp.float() - x_q.float(), x_q)

    @property
    def C(self) -> torch.Tensor:
        return self.mean


def qep_target(W: torch.Tensor, H: torch.Tensor, C: torch.Tensor, alpha: float, damp: float) -> torch.Tensor:
    """W + alpha W C (H + damp mean(diag H) I)^-1: the writer target without a residual term."""
    return lpcd_writer_target(W, H, C, None, alpha, damp)


class ResidualAccumulator(OuterSum):
    """R = (h - h^) X^^T / N: the residual-stream error at a writer's add (out x N) against
    the writer's quantized-stream input (in x N)."""

    def add(self, r_fp: torch.Tensor, r_q: torch.Tensor, x_q: torch.Tensor) -> None:
        self.add_outer(r_fp.float() - r_q.float(), x_q)

    @property
    def R(self) -> torch.Tensor:
        return self.mean


def lpcd_writer_target(W: torch.Tensor, H: torch.Tensor, C: torch.Tensor, R: torch.Tensor | None,
                       alpha: float, damp: float) -> torch.Tensor:
    """Relax a residual writer (o_proj, down_proj) to the FP submodule output plus the residual
    error at its add: argmin ||W X + (h - h^) - W' X^||^2 =
        W + (W C + R) (H^ + lam I)^-1            (alpha scales the correction)"""
    Hd = H.double().clone()
    Hd.diagonal().add_(damp * float(torch.diagonal(Hd).mean()) + 1e-12)
    L, info = torch.linalg.cholesky_ex(Hd)
    if int(info) != 0:                     # not positive definite: leave the target alone
        return W
    G = W.double() @ C.double()             # out x in
    if R is not None:
        G = G + R.double()
    delta = torch.cholesky_solve(G.t(), L).t()   # (H^-1 G^T)^T = G H^-1 (H symmetric)
    return (W.double() + alpha * delta).to(W.dtype)
