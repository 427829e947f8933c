"""Block-wise reconstruction through trainable views (pure training math, no plugin glue).

For one decoder block B with quantized linears whose stored tensors are seen through trainable
views theta (scales, zero points, envelopes; code or sign latents):

    L(theta) = mean ||B_theta(h^) - B_fp(h)||^2 + beta (1 - cos(B_theta(h^), B_fp(h)))   (block MSE + cosine)

h^ is the quantized stream entering the block, B_fp(h) the FP block's output on the FP stream.
Adam with one learning rate per parameter kind, cosine decay after a linear warm-up over the
first 10% of the steps, gradient norm clipped; the smooth estimators' temperature falls
geometrically from tau0 to tau1 over the steps (progressive annealing, PSTA).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from onecomp_core.sdk import TrainableLinear, cast_floats, geometric, go_round, warmup_cosine

DISCRETE = ("codes",)       # parameter kinds trained through a smooth straight-through estimator


lr_factor = warmup_cosine        # linear warm-up over the first 10% of the steps, then cosine decay
temperature = geometric         # tau_t = tau0 (tau1 / tau0)^(t / (T - 1)): annealing of the estimators


def block_loss(y: torch.Tensor, t: torch.Tensor, beta: float) -> torch.Tensor:
    """MSE of the block outputs + beta (1 - mean per-token cosine)."""
    y, t = y.float(), t.float()
    loss = ((y - t) ** 2).mean()
    if beta:
        loss = loss + beta * (1.0 - F.cosine_similarity(y.flatten(0, -2), t.flatten(0, -2), dim=-1).mean())
    return loss


def split_rows(n: int, heldout: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded split of n samples into (training rows, held-out rows); at least one of each
    when n >= 2 (with one sample both are that sample)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    if n < 2:
        return perm, perm
    k = min(n - 1, max(1, round(heldout * n)))
    return sorted(perm[k:]), sorted(perm[:k])


def swap_in(block: torch.nn.Module, views: dict) -> dict:
    """Put a TrainableLinear over each view in place of the block's linear; -> the originals."""
    originals = {}
    for rel, view in views.items():
        parent_name, _, child = rel.rpartition(".")
        parent = block.get_submodule(parent_name) if parent_name else block
        old = getattr(parent, child)
        originals[rel] = old
        setattr(parent, child, TrainableLinear(view, getattr(old, "bias", None)))
    return originals


def swap_out(block: torch.nn.Module, originals: dict) -> None:
    for rel, old in originals.items():
        parent_name, _, child = rel.rpartition(".")
        setattr(block.get_submodule(parent_name) if parent_name else block, child, old)


def compute_in(block: torch.nn.Module, dtype) -> dict:
    """Cast the block's floating parameters and buffers to ``dtype``; -> what ``restore_dtypes``
    needs to put each back in its own dtype (a block may mix them, e.g. fp32 buffers)."""
    saved = {}
    for name, t in list(block.named_parameters()) + list(block.named_buffers()):
        if t.is_floating_point() and t.dtype != dtype:
            saved[name] = t.dtype
            t.data = t.data.to(dtype)
    return saved


def restore_dtypes(block: torch.nn.Module, saved: dict) -> None:
    tensors = dict(block.named_parameters()) | dict(block.named_buffers())
    for name, dt in saved.items():
        tensors[name].data = tensors[name].data.to(dt)


def optimizer(views: dict, lr: dict[str, float], train: dict[str, bool]) -> torch.optim.Adam:
    """Adam over the views' parameters, one group per kind. Scale-like kinds take ``lr`` relative
    to each tensor's RMS (a scale of 0.01 and an envelope of 1 move by the same fraction);
    latent codes take it in units of one grid step."""
    groups = []
    for view in views.values():
        for kind, params in view.param_groups().items():
            on = train.get(kind, True)
            for p in params:
                p.requires_grad_(on and p.requires_grad)
                if not p.requires_grad:
                    continue
                rate = lr[kind] if kind in DISCRETE else lr[kind] * float(p.detach().pow(2).mean().sqrt().clamp_min(1e-8))
                groups.append({"params": [p], "lr": rate, "base_lr": rate})
    return torch.optim.Adam(groups) if groups else None


def reconstruct(block, views: dict, inputs, targets, kwargs, rows: list[int], *, epochs: int, batch: int,
                lr: dict[str, float], train: dict[str, bool], beta: float, tau0: float, tau1: float,
                clip: float, seed: int, dtype=torch.float32, sync=None, steps_per_epoch: int | None = None) -> list[float]:
    """Train ``views`` (relative module name -> TrainableView of that linear) so the block
    matches ``targets`` on ``inputs`` over the samples ``rows``; the block computes in
    ``dtype`` meanwhile (its own dtype is restored). -> the mean training loss of each epoch.
    Data-parallel: ``sync(params)`` averages the gradients over the ranks before each step, and
    every rank runs ``steps_per_epoch`` steps (the most any rank needs; a rank with fewer rows
    goes round its shuffled rows again)."""
    opt = optimizer(views, lr, train)
    if opt is None or not rows or epochs == 0:
        return []
    steps_per_epoch = steps_per_epoch or math.ceil(len(rows) / batch)
    total = epochs * steps_per_epoch
    g = torch.Generator().manual_seed(seed)
    training = {id(p) for grp in opt.param_groups for p in grp["params"]}   # views may already sit in the block
    frozen = [(p, p.requires_grad) for p in block.parameters() if id(p) not in training]
    for p, _ in frozen:
        p.requires_grad_(False)
    originals = swap_in(block, views)
    saved = compute_in(block, dtype)
    kw = cast_floats(kwargs, dtype)
    history, step = [], 0
    try:
        for _ in range(epochs):
            order = go_round([rows[i] for i in torch.randperm(len(rows), generator=g).tolist()],
                             steps_per_epoch, batch)                  # another rank may have more rows
            total_loss = 0.0
            for b in range(0, len(order), batch):
                idx = order[b:b + batch]
                for v in views.values():
                    v.set_temperature(temperature(step, total, tau0, tau1))
                for grp in opt.param_groups:
                    grp["lr"] = grp["base_lr"] * lr_factor(step, total)
                opt.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    y = block(inputs[idx].to(dtype), **kw)
                    y = y[0] if isinstance(y, tuple) else y
                    loss = block_loss(y, targets[idx], beta)
                    loss.backward()
                if sync is not None:
                    sync([p for grp in opt.param_groups for p in grp["params"]])
                if clip:
                    torch.nn.utils.clip_grad_norm_([p for grp in opt.param_groups for p in grp["params"]], clip)
                opt.step()
                total_loss += float(loss.detach()) * len(idx)
                step += 1
            history.append(total_loss / len(order))
    finally:
        swap_out(block, originals)
        restore_dtypes(block, saved)
        for p, f in frozen:
            p.requires_grad_(f)
    return history
