"""The student: a loaded quantized model whose quantized modules are replaced by trainable views
of their stored tensors, and the resumable per-epoch state of its training."""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from onecomp_core.sdk import TrainableLinear

_BLOCK = re.compile(r"\.(\d+)\.")


def block_of(name: str) -> int:
    """The decoder block a module belongs to: the first numeric part of its name (-1: none)."""
    m = _BLOCK.search(f".{name}.")
    return int(m.group(1)) if m else -1


def attach_views(model: torch.nn.Module, qts: dict, plan, formats: dict) -> dict:
    """Put a TrainableLinear over each stored tensor in place of the model's quantized module;
    -> {module name: view}."""
    views = {}
    for name, qt in qts.items():
        spec = plan[name]
        view = formats[spec.format].trainable(qt, spec)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        bias = getattr(old, "bias", None)
        setattr(parent, child, TrainableLinear(view, None if bias is None else bias.detach().float()))
        views[name] = view
    return views


def save_state(path: Path, state: dict) -> None:
    """Atomically: a killed save leaves the previous state (or none), never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_state(path: Path | None) -> dict | None:
    if path is None or not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)
