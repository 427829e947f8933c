"""The pure math of ``awq``: per input channel of a group of linears that read the same input X,
  s = mean|x|^alpha,  normalised to s / sqrt(max s min s),
with alpha on a grid in [0, 1) chosen to minimise the group's output error after quantization
  sum_i || (Q(W_i diag(s)) diag(s)^-1 - W_i) X ||^2 = sum_i tr(D_i H D_i^T),  H = X^T X / N,
Q the run's grid (round to nearest). alpha = 0 is s = 1, the untransformed group, so the chosen
scales are never worse than none on this objective. The run's own projector (e.g. GPTQ, which
already spreads rounding error by H) may gain less from them: :func:`projected_error` measures the
same objective with it, in the scaled coordinates W diag(s) and H_s = diag(s)^-1 H diag(s)^-1, so
the glue can keep s only where it beats s = 1 there too. The inverse 1/s is folded into whatever
produces X (a norm's gain, or the rows of the linear before), which keeps the model's function.
"""
from __future__ import annotations

import torch

from onecomp_core.sdk import grid


def scales_for(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|x|^alpha over the input channels, normalised to geometric centre 1 (float64)."""
    s = mean_abs.double().clamp_min(1e-8) ** alpha
    return s / (s.max() * s.min()).sqrt()


def group_error(weights: list[torch.Tensor], H: torch.Tensor, s: torch.Tensor, bits: int, group_size: int,
                symmetric: bool) -> float:
    """sum_i tr(D_i H D_i^T), D_i = Q(W_i diag(s)) diag(s)^-1 - W_i."""
    total = 0.0
    Hd = H.double()
    for W in weights:
        Ws = W.double() * s[None, :]
        q, sc, z = grid.rtn(Ws.float(), bits, group_size, symmetric)
        cols = W.shape[1]
        Wq = grid.dequantize(q.double(), grid.expand(sc, cols, group_size).double(), grid.expand(z, cols, group_size).double())
        D = Wq / s[None, :] - W.double()
        total += float(((D @ Hd) * D).sum())
    return total


def search(weights: list[torch.Tensor], H: torch.Tensor, mean_abs: torch.Tensor, bits: int, group_size: int,
           symmetric: bool, steps: int = 20) -> tuple[torch.Tensor, float, float, float]:
    """-> (s, alpha, error with s, error without): the best alpha of k / steps, k < steps."""
    best = None
    none = None
    for k in range(steps):
        alpha = k / steps
        s = scales_for(mean_abs, alpha)
        err = group_error(weights, H, s, bits, group_size, symmetric)
        if k == 0:
            none = err
        if best is None or err < best[2]:
            best = (s, alpha, err)
    return best[0], best[1], best[2], none


def projected_error(weights: dict, H: torch.Tensor, s: torch.Tensor, project) -> float:
    """sum_i tr(D_i H D_i^T), D_i = P(W_i diag(s), H_s) diag(s)^-1 - W_i, with P = ``project(name,
    W, H)`` (the run's projector, dequantized; None for a module it leaves in full precision)."""
    Hd = H.double()
    Hs = Hd / s[:, None] / s[None, :]                                   # H_s = diag(s)^-1 H diag(s)^-1
    total = 0.0
    for name, W in weights.items():
        Wq = project(name, (W.double() * s[None, :]).float(), Hs.float())
        if Wq is None:
            continue
        D = Wq.double() / s[None, :] - W.double()
        total += float(((D @ Hd) * D).sum())
    return total
