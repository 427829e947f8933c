"""Global PTQ by distillation: the pure math (losses, schedules, SAM), no plugin glue.

    L = T^2 KL(softmax(z_t / T) || softmax(z_s / T))                      (token-level distillation)
        + gamma mean_l (1 - cos(h_l^s, h_l^t))                              (optional hidden-state term)
        - eta H(softmax(z_s / T))                                           (optional entropy regulariser)

z_t, z_s: teacher (FP) and student (quantized) logits; h_l: hidden states after block l.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def kl_loss(student: torch.Tensor, teacher: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """Mean per-token T^2 KL(p_t || p_s) over (..., vocab) logits."""
    ls = F.log_softmax(student.float() / T, -1)
    lt = F.log_softmax(teacher.float() / T, -1)
    return (T * T) * (lt.exp() * (lt - ls)).sum(-1).mean()


def entropy(logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """Mean per-token entropy of softmax(logits / T)."""
    lp = F.log_softmax(logits.float() / T, -1)
    return -(lp.exp() * lp).sum(-1).mean()


def hidden_cosine(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """mean over layers and tokens of 1 - cos(h_s, h_t)."""
    terms = [1.0 - F.cosine_similarity(s.float().flatten(0, -2), t.float().flatten(0, -2), dim=-1).mean()
             for s, t in zip(student, teacher)]
    return torch.stack(terms).mean()


def unfrozen(epoch: int, epochs: int, blocks: int, progressive: bool) -> range:
    """The blocks trained in ``epoch``: all, or (progressive unfreezing from the output side)
    the last ceil(blocks (epoch + 1) / epochs)."""
    if not progressive:
        return range(blocks)
    k = math.ceil(blocks * (epoch + 1) / max(1, epochs))
    return range(blocks - k, blocks)


def sam_perturb(params: list[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """Sharpness-aware minimisation, first half: move each parameter by eps = rho g / ||g|| (the
    ascent direction); -> the eps to take back once the gradient there is known."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads)) if grads else torch.tensor(0.0)
    eps = []
    with torch.no_grad():
        for p in params:
            e = torch.zeros_like(p) if p.grad is None or norm == 0 else rho * p.grad / norm
            p.add_(e)
            eps.append(e)
    return eps


def sam_restore(params: list[torch.Tensor], eps: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, e in zip(params, eps):
            p.sub_(e)
