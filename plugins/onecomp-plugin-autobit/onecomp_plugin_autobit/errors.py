"""Predicted error of a candidate: the RTN perturbation dW of a module weighted by diagonal
curvature, sum_ij dW_ij^2 A_jj B_ii, with A the input Gram diagonal (activation-aware) and B
the output curvature diagonal (ones when not measured). ``A = B = 1`` is the plain Frobenius
error of the naive model."""
from __future__ import annotations

import torch

from onecomp_core.formats import grid


def candidate_error(W: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                    A: torch.Tensor | None = None, B: torch.Tensor | None = None) -> float:
    codes, scale, zero = grid.rtn(W, bits, group_size, symmetric)
    cols = W.shape[1]
    dW = grid.dequantize(codes.float(), grid.expand(scale, cols, group_size), grid.expand(zero, cols, group_size)) - W
    sq = dW * dW
    if A is not None:
        sq = sq * A[None, :].to(sq)
    if B is not None:
        sq = sq * B[:, None].to(sq)
    return float(sq.sum())


def output_curvature(folder, ids: torch.Tensor, names: list[str], device="cpu", max_samples: int = 8) -> dict:
    """B_ii = mean over tokens of (dL/dy_i)^2 for the output y of each named linear, from the
    language-modelling loss on calibration samples (loads the full FP model)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(device)
    model.eval()
    sums = {n: None for n in names}
    counts = {n: 0 for n in names}
    hooks = []
    for n in names:
        mod = model.get_submodule(n)

        def hook(m, gin, gout, n=n):
            g = gout[0].reshape(-1, gout[0].shape[-1]).float()
            s = (g * g).sum(0).detach()
            sums[n] = s if sums[n] is None else sums[n] + s
            counts[n] += g.shape[0]
        hooks.append(mod.register_full_backward_hook(hook))
    try:
        for row in ids[:max_samples]:
            x = row[None].to(device)
            loss = model(input_ids=x, labels=x).loss
            model.zero_grad(set_to_none=True)
            loss.backward()
    finally:
        for h in hooks:
            h.remove()
    return {n: (sums[n] / max(counts[n], 1)).cpu() if sums[n] is not None else None for n in names}
