"""Per-channel input scaling folded into the preceding norm: the pure math of the template
preprocessor ``colscale``.

A norm with weight w (output x_hat * (c + w), c = 0 for Llama-style RMSNorm, 1 for Gemma's)
feeds linear maps W_1..W_m (q/k/v, or gate/up and a MoE router). For any positive s,
    W_i x = (W_i diag(s)) (diag(1/s) x),
so scaling the norm's output by 1/s, (c + w') = (c + w) / s, and the columns of every W_i by s
leaves the block's function unchanged. This template picks
    s_j = (max_i |W_ij|)^(-alpha)   over the stacked W_i, normalised to geometric mean 1,
which evens out the columns' ranges (alpha = 1: every column's largest magnitude becomes equal).
Arithmetic in float64, cast back to the weights' dtype.
"""
from __future__ import annotations

import torch


def column_scales(weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s (in,) in float64 from the column maxima of the stacked ``weights`` (each out_i x in)."""
    cols = torch.cat([w.detach().double().abs() for w in weights], 0).amax(0)
    s = cols.clamp_min(1e-12) ** (-alpha)
    return s / torch.exp(torch.log(s).mean())              # geometric mean 1: the norm weights stay in range


def fold(norm_weight: torch.Tensor, offset: float, weights: list[torch.Tensor], s: torch.Tensor) -> None:
    """In place: (c + w) <- (c + w) / s on the norm, W_i <- W_i diag(s) on every reader."""
    with torch.no_grad():
        w = (offset + norm_weight.double()) / s - offset
        norm_weight.copy_(w.to(norm_weight.dtype))
        for W in weights:
            W.copy_((W.double() * s[None, :]).to(W.dtype))
