"""The student (a loaded quantized model whose quantized modules are replaced by trainable views
of their stored tensors: ``sdk.attach_views``) and the resumable per-epoch state of its training."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from onecomp_core.sdk import atomic_torch_save, attach_views  # noqa: F401  (attach_views re-exported)

_BLOCK = re.compile(r"\.(\d+)\.")


def block_of(name: str) -> int:
    """The decoder block a module belongs to: the first numeric part of its name (-1: none)."""
    m = _BLOCK.search(f".{name}.")
    return int(m.group(1)) if m else -1


def save_state(path: Path, state: dict) -> None:
    """Atomically: a killed save leaves the previous state (or none), never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(path, state)


def load_state(path: Path | None) -> dict | None:
    if path is None or not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)
