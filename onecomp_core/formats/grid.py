"""Uniform group-wise integer grid: the pure math shared by RTN, GPTQ and JointQ.

Per group (``group_size`` consecutive input columns of a row; the whole row when per-channel,
``group_size = -1``), with maxq = 2^b - 1:
  asymmetric  s = (max - min) / maxq, z = round(-min / s)
  symmetric   s = 2 max|w| / maxq,    z = (maxq + 1) / 2
  q = clamp(round(w / s) + z, 0, maxq),  w^ = s (q - z)
Scales are rounded to a 16-bit float (``scale_dtype``: fp16, or bf16 for bf16 checkpoints) when
fitted, so the 16-bit scale of the format's bit accounting holds exactly in whatever dtype the
checkpoint stores them. A partial last group (when
group_size does not divide in_features) is simply shorter.
"""
from __future__ import annotations

import math

import torch

PER_CHANNEL = -1


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == PER_CHANNEL else math.ceil(in_features / group_size)


def group_index(in_features: int, group_size: int, device=None) -> torch.Tensor:
    """Group of each input column, shape (in_features,)."""
    cols = torch.arange(in_features, device=device)
    return torch.zeros_like(cols) if group_size == PER_CHANNEL else cols // group_size


def expand(per_group: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """(out, G) -> (out, in): the value of each column's group."""
    return per_group[:, group_index(in_features, group_size, per_group.device)]


def _params_from_range(xmin, xmax, bits: int, symmetric: bool, scale_dtype=torch.float16):
    maxq = 2**bits - 1
    if symmetric:
        amax = torch.maximum(xmin.abs(), xmax)
        amax = torch.where(amax == 0, torch.ones_like(amax), amax)
        scale = 2 * amax / maxq
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        both0 = (xmin == 0) & (xmax == 0)
        xmin = torch.where(both0, -torch.ones_like(xmin), xmin)
        xmax = torch.where(both0, torch.ones_like(xmax), xmax)
        scale = (xmax - xmin) / maxq
    scale = scale.to(scale_dtype).float().clamp_min(torch.finfo(scale_dtype).tiny)
    if not symmetric:
        zero = torch.clamp(torch.round(-xmin / scale), 0, maxq)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes for w given per-row (broadcastable) scale and zero."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


def fit(w: torch.Tensor, bits: int, symmetric: bool, mse_steps: int = 0,
        max_shrink: float = 0.8, norm: float = 2.4, scale_dtype=torch.float16, weight: torch.Tensor | None = None,
        gram: torch.Tensor | None = None):
    """Scale and zero for each row of ``w`` (rows x n): min/max range, optionally shrunk
    over a grid of ``mse_steps`` factors keeping the smallest sum_j d_j |w_j - w^_j|^norm per row
    (d = ``weight``, (n,) or (rows, n), e.g. the Hessian's diagonal; all ones when None), or with
    ``gram`` (k, n, n), rows ordered (r, k): the smallest output error e H_k e^T, e = w^ - w."""
    w = w.float()
    xmin = torch.clamp(w.min(dim=1).values, max=0)
    xmax = torch.clamp(w.max(dim=1).values, min=0)
    scale, zero = _params_from_range(xmin, xmax, bits, symmetric, scale_dtype)
    if mse_steps <= 0:
        return scale, zero
    best = torch.full_like(scale, float("inf"))
    buf = torch.empty_like(w)
    for i in range(int(max_shrink * mse_steps)):
        p = 1 - i / mse_steps
        s, z = _params_from_range(p * xmin, p * xmax, bits, symmetric, scale_dtype)
        if gram is None:
            err = _grid_error(w, s[:, None], z[:, None], bits, norm, buf, weight)
        else:
            err = _output_error(w, s[:, None], z[:, None], bits, gram, buf)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def _residual(w, s, z, bits: int, buf: torch.Tensor) -> torch.Tensor:
    """e = w^ - w, w^ = dequantize(quantize(w)): the same operations as those two functions, in
    place in ``buf`` (the clipping search's cost is memory traffic, not arithmetic)."""
    e = torch.div(w, s, out=buf).round_().add_(z).clamp_(0, 2**bits - 1)       # q
    return e.sub_(z).mul_(s).sub_(w)                                              # s (q - z) - w


def _grid_error(w, s, z, bits: int, norm: float, buf: torch.Tensor, weight=None) -> torch.Tensor:
    """sum_j d_j |w^ - w|^norm per row."""
    e = _residual(w, s, z, bits, buf).abs_().pow_(norm)                          # |w^ - w|^norm
    if weight is not None:
        e.mul_(weight)                                                            # d_j |.|^norm
    return e.sum(1)


def _output_error(w, s, z, bits: int, gram: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """e H_k e^T per row, e = w^ - w, H_k the Gram matrix of the row's group (rows ordered (r, k))."""
    e = _residual(w, s, z, bits, buf).view(-1, gram.shape[0], gram.shape[1])     # (r, k, n)
    return (torch.einsum("rkn,knm->rkm", e, gram) * e).sum(-1).reshape(-1)      # e H_k e^T


def fit_groups(W: torch.Tensor, bits: int, group_size: int, symmetric: bool, weight=None, gram=None, **mse):
    """(out, G) scales and zeros for every group of W; ``weight`` (in,): each column's weight in
    the clipping search's error; ``gram`` (in, in): search on each group's output error instead,
    with the group's diagonal block of it."""
    out, cols = W.shape
    if group_size == PER_CHANNEL:
        s, z = fit(W, bits, symmetric, weight=weight, gram=None if gram is None else gram[None], **mse)
        return s[:, None], z[:, None]
    full = cols // group_size                 # the whole groups, fitted together as rows of one matrix
    n = full * group_size
    rows_w = None if weight is None else weight[:n].view(1, full, group_size).expand(
        out, full, group_size).reshape(out * full, group_size)                 # row (o, g) -> group g's columns
    scales, zeros = [], []
    if full:
        blocks = None if gram is None else torch.stack(
            [gram[k * group_size:(k + 1) * group_size, k * group_size:(k + 1) * group_size] for k in range(full)])
        s, z = fit(W[:, :n].reshape(out * full, group_size), bits, symmetric, weight=rows_w, gram=blocks, **mse)
        scales, zeros = [s.view(out, full)], [z.view(out, full)]
    if cols > n:                              # a shorter last group
        s, z = fit(W[:, n:], bits, symmetric, weight=None if weight is None else weight[n:],
                   gram=None if gram is None else gram[n:, n:][None], **mse)
        scales.append(s[:, None])
        zeros.append(z[:, None])
    return torch.cat(scales, 1), torch.cat(zeros, 1)


def rtn(W: torch.Tensor, bits: int, group_size: int, symmetric: bool, **mse):
    """Round-to-nearest: -> codes (out, in) uint8, scale (out, G), zero (out, G)."""
    scale, zero = fit_groups(W, bits, group_size, symmetric, **mse)
    cols = W.shape[1]
    q = quantize(W.float(), expand(scale, cols, group_size), expand(zero, cols, group_size), bits)
    return q.to(torch.uint8), scale, zero
