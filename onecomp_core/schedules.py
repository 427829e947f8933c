"""Schedules shared by refiners that train (learning rate, estimator temperature)."""
from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, warmup: float = 0.1) -> float:
    """Learning-rate factor: linear warm-up over the first ``warmup`` of the steps, then cosine
    decay to 0."""
    w = max(1, int(round(warmup * total)))
    if step < w:
        return (step + 1) / w
    return 0.5 * (1.0 + math.cos(math.pi * (step - w) / max(1, total - w)))


def go_round(order: list, steps: int, batch: int) -> list:
    """``order`` lengthened by going round it again until it fills ``steps`` batches of
    ``batch`` (data-parallel training: a rank with fewer samples takes as many steps as the rank
    with the most); unchanged when its own batches already number ``steps``."""
    if steps <= math.ceil(len(order) / batch):
        return order
    return (order * math.ceil(steps * batch / len(order)))[:steps * batch]


def geometric(step: int, total: int, start: float, end: float) -> float:
    """start (end / start)^(t / (T - 1)): e.g. an estimator temperature annealed from start to end."""
    return start * (end / start) ** (step / max(1, total - 1))
