"""Predicted error of a candidate: the perturbation dW of a module under a fast proxy (RTN for
uniform candidates, a short fit for binary-factor ones) weighted by diagonal curvature,
sum_ij dW_ij^2 A_jj B_ii (the diagonal of the Kronecker-factored second-order loss increase),
with A the input Gram diagonal and B the output curvature diagonal (ones when not measured).
``A = B = 1`` is the plain Frobenius error of the naive model. The GPTQ-aware model
(``error: conditional``) replaces A_jj by the conditional variance of input j given the inputs
that GPTQ quantizes after it, which absorb part of its rounding error: 1 / U_jj^2 with
U^T U = H^-1 in GPTQ's column order (GPTQ's per-column loss weight)."""
from __future__ import annotations

import torch

from onecomp_core.sdk import damp_hessian, grid, inverse_cholesky_upper, quiet_loading, release_memory


def rtn_weight(W: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """The RTN proxy of a grid candidate: W rounded to its grid, dequantized (fp32)."""
    codes, scale, zero = grid.rtn(W, bits, group_size, symmetric)
    cols = W.shape[1]
    return grid.dequantize(codes.float(), grid.expand(scale, cols, group_size), grid.expand(zero, cols, group_size))


def row_errors(dW: torch.Tensor, A: torch.Tensor | None = None) -> torch.Tensor:
    """(out,): sum_j dW_ij^2 A_jj per output row, to be weighted by the output curvature B_ii."""
    sq = dW.float() * dW.float()
    return (sq * A[None, :].to(sq)).sum(1) if A is not None else sq.sum(1)


def total_error(rows: torch.Tensor, B: torch.Tensor | None = None) -> float:
    """sum_i B_ii rows_i (B: ones when None)."""
    return float(rows.sum() if B is None else rows @ B.to(rows))


def candidate_error(W: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                    A: torch.Tensor | None = None, B: torch.Tensor | None = None) -> float:
    return weighted_error(rtn_weight(W, bits, group_size, symmetric) - W.float(), A, B)


def weighted_error(dW: torch.Tensor, A: torch.Tensor | None = None, B: torch.Tensor | None = None) -> float:
    """sum_ij dW_ij^2 A_jj B_ii (A, B: ones when None)."""
    return total_error(row_errors(dW, A), B)


def conditional_variances(H: torch.Tensor, damp: float = 0.01, act_order: bool = True) -> torch.Tensor:
    """c_j = H_jj - H_j,L H_L,L^-1 H_L,j, L = the inputs after j in GPTQ's order (descending
    diag H with act-order), computed as 1 / U_jj^2 with U^T U = (H + damp mean(diag H) I)^-1.
    Dead inputs (H_jj = 0) get 0."""
    d = H.diagonal().double()
    Hd, dead = damp_hessian(H, damp)
    perm = torch.argsort(d, descending=True) if act_order else torch.arange(H.shape[0], device=H.device)
    U = inverse_cholesky_upper(Hd[perm][:, perm], damp)
    c = torch.empty_like(d)
    c[perm] = 1.0 / U.diagonal() ** 2                       # GPTQ: loss of column j = e_j^2 / [H_F^-1]_jj
    c[dead] = 0
    return c.float()


def output_curvature(folder, ids: torch.Tensor, names: list[str], device="cpu", max_samples: int = 8,
                     fisher: str = "empirical", seed: int = 0) -> dict:
    """B_ii = mean over tokens of (dL/dy_i)^2 for the output y of each named linear (the
    diagonal of the output factor of the Kronecker-factored Fisher), L the cross-entropy of
    the calibration samples against
      fisher="empirical": their own next tokens (the empirical Fisher), or
      fisher="true": tokens drawn from the model's own next-token distribution (one draw per
        position: an unbiased estimate of the Fisher, the Hessian of KL(p_FP || p_Q) at Q = FP).
    Loads the full FP model once; only activations get gradients (the embeddings are the
    leaf), so no parameter gradients are stored."""
    from transformers import AutoModelForCausalLM
    release_memory()                  # the statistics passes before this one leave freed pages resident
    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(device)
    model.eval().requires_grad_(False)
    sums: dict = {n: None for n in names}
    counts = {n: 0 for n in names}

    def grab(n):
        def on_grad(g):
            g = g.reshape(-1, g.shape[-1]).float()
            s = (g * g).sum(0)
            sums[n] = s if sums[n] is None else sums[n] + s
            counts[n] += g.shape[0]

        def forward_hook(m, inputs, out):
            if out.requires_grad:
                out.register_hook(on_grad)
        return forward_hook
    hooks = [model.get_submodule(n).register_forward_hook(grab(n)) for n in names]
    g = torch.Generator(device=device).manual_seed(seed)
    try:
        for row in ids[:max_samples]:
            x = row[None].to(device)
            emb = model.get_input_embeddings()(x).detach().requires_grad_(True)
            if fisher == "empirical":
                model(inputs_embeds=emb, labels=x).loss.backward()
            else:
                logits = model(inputs_embeds=emb).logits[0].float()
                y = torch.multinomial(torch.softmax(logits.detach(), -1), 1, generator=g).squeeze(1)
                torch.nn.functional.cross_entropy(logits, y).backward()
            release_memory()          # each sample's vocabulary-sized temporaries, before the next one's
    finally:
        for h in hooks:
            h.remove()
    # a module no calibration token reached (an unused expert) has no measured sensitivity: 0,
    # as its input Gram diagonal is
    return {n: (sums[n] / counts[n]).cpu() if sums[n] is not None
            else torch.zeros(model.get_submodule(n).out_features) for n in names}
