"""The damped input Hessian H = X X^T / N and the upper Cholesky factor of its inverse, shared
by second-order projectors (GPTQ, JointQ) and planners that predict their error (AutoBit)."""
from __future__ import annotations

import torch


def damp_hessian(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (H', dead): in float64, dead inputs (H_ii = 0) get H_ii = 1, then
    H' = H + damp * mean(diag H) * I."""
    H = H.clone().double()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H += damp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    return H, dead


def inverse_cholesky_upper(H: torch.Tensor, damp: float = 0.01, tries: int = 6) -> torch.Tensor:
    """U with U^T U = H^-1 (upper triangular); adds more damping if H is not positive definite."""
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    mean_diag = torch.mean(torch.diag(H))
    for k in range(tries):
        L, info = torch.linalg.cholesky_ex(H + (0 if k == 0 else damp * 10**k) * mean_diag * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info2 = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info2) == 0:
                return U
    raise RuntimeError("Hessian is not positive definite even after extra damping")
