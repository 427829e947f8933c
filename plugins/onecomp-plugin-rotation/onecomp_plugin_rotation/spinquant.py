"""The pure math of ``spinquant``: the model with its weights rotated by (R1, R2) and fake-quantized
to the run's grid, differentiable in R1 and R2, and the Cayley step that keeps them orthogonal.

Effective weights (fuse.py's rotation, written as functions of R1, R2):
  readers  W diag(g) R1 (a value projection then B2^T per head),  writers  R1^T W (o_proj then B2)
  stream   x' = x R1 (the captured block-0 inputs),  head  W_h diag(g_f) R1,  every norm gain 1 - c,
with B2 = diag(R2, ..., R2). Quantized linears are fake-quantized by round-to-nearest on the run's
grid with a straight-through gradient: Q(W) = W + (dequant(quant(W)) - W) held constant; the
grid's range per group optionally shrunk by GPTQ's clipping search (clip_steps; unweighted: sum |e|^2.4), as
the run's projector clips, so that the model learned against is near the one the run will make.
Loss (default): KL(p_FP || p_Q) per token, p_FP from the unrotated FP model (rotations keep it).
Cayley SGD on the Stiefel manifold (Li et al. 2020): with G = dL/dR,
  A = G R^T - R G^T (skew),  R <- (I + lr/2 A)^-1 (I - lr/2 A) R,
which is orthogonal whenever R is.
"""
from __future__ import annotations

import torch

from onecomp_core.sdk import grid


def fake_quant(W: torch.Tensor, bits: int, group_size: int, symmetric: bool, clip_steps: int = 0) -> torch.Tensor:
    """Q(W) with a straight-through gradient (the grid fitted to the detached weights; with
    ``clip_steps``, each group's range shrunk by GPTQ's clipping search, unweighted)."""
    with torch.no_grad():
        q, s, z = grid.rtn(W.detach().float(), bits, group_size, symmetric, mse_steps=clip_steps)
        cols = W.shape[1]
        Wq = grid.dequantize(q.float(), grid.expand(s, cols, group_size), grid.expand(z, cols, group_size))
    return W + (Wq.to(W.dtype) - W).detach()


def token_kl(logits: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(p_FP || p_Q): sum_v p_FP (log p_FP - log p_Q), logits (L, V)."""
    logq = torch.log_softmax(logits.float(), -1)
    return (teacher_logp.exp() * (teacher_logp - logq)).sum(-1).mean()


def per_head(h: int, n: int, R2: torch.Tensor) -> torch.Tensor:
    """B2 = diag(R2, ..., R2) of size n (n / h heads)."""
    return torch.block_diag(*[R2] * (n // h))


def effective_params(block, lay, R1, R2, quantized: set, grid_args: tuple) -> dict:
    """{parameter name: tensor} of ``block`` rotated by (R1, R2) and fake-quantized
    (``grid_args``: fake_quant's bits, group_size, symmetric[, clip_steps])."""
    params = dict(block.named_parameters())
    out = {}
    for norm, readers in lay.norms.items():
        w = params[f"{norm}.weight"]
        g = lay.offset + w.detach()
        out[f"{norm}.weight"] = torch.full_like(w, 1.0 - lay.offset)
        for r in readers:
            W = params[f"{r}.weight"] * g[None, :] @ R1
            if R2 is not None and r == lay.value[0]:
                first = lay.value[1]
                B2 = per_head(lay.head_dim, W.shape[0] - first, R2)
                W = torch.cat([W[:first], B2.T @ W[first:]], 0)
            out[f"{r}.weight"] = W
        if R2 is not None and f"{lay.value[0]}.bias" in params and lay.value[0] in readers:
            b, first = params[f"{lay.value[0]}.bias"], lay.value[1]
            out[f"{lay.value[0]}.bias"] = torch.cat([b[:first], per_head(lay.head_dim, b.shape[0] - first, R2).T @ b[first:]])
    for name in lay.writers:
        W = R1.T @ params[f"{name}.weight"]
        if R2 is not None and name == lay.output:
            W = W @ per_head(lay.head_dim, W.shape[1], R2)
        out[f"{name}.weight"] = W
        if f"{name}.bias" in params:
            out[f"{name}.bias"] = R1.T @ params[f"{name}.bias"]
    for name in quantized:
        key = f"{name}.weight"
        out[key] = fake_quant(out.get(key, params[key]), *grid_args)
    return out


def cayley_step(R: torch.Tensor, G: torch.Tensor, lr: float) -> torch.Tensor:
    """R <- (I + lr/2 A)^-1 (I - lr/2 A) R, A = G R^T - R G^T."""
    A = G @ R.T - R @ G.T
    eye = torch.eye(R.shape[0], dtype=R.dtype, device=R.device)
    return torch.linalg.solve(eye + lr / 2 * A, (eye - lr / 2 * A) @ R)


def orthonormalise(R: torch.Tensor) -> torch.Tensor:
    """The nearest orthogonal matrix (polar factor, float64): removes the rounding drift of many steps."""
    U, _, Vh = torch.linalg.svd(R.double())
    return U @ Vh
