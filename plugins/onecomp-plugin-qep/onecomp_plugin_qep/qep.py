"""QEP: quantization error propagation (the pure math; docs/algorithms.md).

Layer l sees the quantized stream's input X^ instead of the FP input X. Aim at the FP output
from the perturbed input: minimise ||W X - W^ X^||^2. With H^ = X^ X^^T / N and the cross
term C = (X - X^) X^^T / N (both sums over calibration tokens, gathered by the core),
    W_target = W + alpha W C (H^ + lam I)^-1          (the QEP correction; alpha = 1 is exact)
A residual writer (o_proj, down_proj) may also absorb the residual-stream error at its add,
R = (h - h^) X^^T / N:  W_target = W + alpha (W C + R) (H^ + lam I)^-1  (LPCD's writer step).
"""
from __future__ import annotations

import torch


def qep_target(W: torch.Tensor, H: torch.Tensor, C: torch.Tensor, alpha: float, damp: float) -> torch.Tensor:
    """W + alpha W C (H + damp mean(diag H) I)^-1."""
    return writer_target(W, H, C, None, alpha, damp)


def writer_target(W: torch.Tensor, H: torch.Tensor, C: torch.Tensor, R: torch.Tensor | None,
                  alpha: float, damp: float) -> torch.Tensor:
    """argmin ||W X + (h - h^) - W' X^||^2 = W + (W C + R) (H^ + lam I)^-1, the correction scaled
    by alpha (R = None: plain QEP). Returns W unchanged if H^ + lam I is not positive definite."""
    Hd = H.double().clone()
    Hd.diagonal().add_(damp * float(torch.diagonal(Hd).mean()) + 1e-12)
    L, info = torch.linalg.cholesky_ex(Hd)
    if int(info) != 0:
        return W
    G = W.double() @ C.double()             # out x in
    if R is not None:
        G = G + R.double()
    delta = torch.cholesky_solve(G.t(), L).t()   # (H^-1 G^T)^T = G H^-1 (H symmetric)
    return (W.double() + alpha * delta).to(W.dtype)
