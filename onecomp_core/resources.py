"""Sizes, durations and what the machine has: the units of the resource-adaptive refine
choice (``--refine auto --max-memory SIZE --time-budget DURATION``)."""
from __future__ import annotations

import os
import re

import torch

from .errors import OnecompError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SECONDS = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600}


def parse_size(text) -> int:
    """'6GiB', '500MB', '1.5 GB', 123 -> bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b|b)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise OnecompError(f"cannot read the size {text!r}; write e.g. 6GiB, 500MB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


def parse_duration(text) -> float:
    """'45m', '2h', '90s', '1h30m', 600 -> seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    parts = re.findall(r"([0-9]*\.?[0-9]+)\s*(min|[smh]?)", str(text).strip().lower())
    rebuilt = "".join(f"{n}{u}" for n, u in parts)
    if not parts or rebuilt != re.sub(r"\s+", "", str(text).strip().lower()):
        raise OnecompError(f"cannot read the duration {text!r}; write e.g. 45m, 2h, 1h30m or a number of seconds")
    return sum(float(n) * _SECONDS[u] for n, u in parts)


def human_bytes(n: float) -> str:
    """Binary units, labelled as such (``--max-memory 2GB`` is 2e9 bytes: 1.9 GiB)."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def human_seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min"


def machine_memory(device: torch.device) -> int:
    """What the run may use by default: the GPU's memory on CUDA, else the machine's RAM."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def release_memory() -> None:
    """Collect what was dropped and hand the C heap's free pages back to the system, so that
    the resident size falls after a model is released (glibc otherwise keeps the freed pages of
    the many mid-sized tensors a model is made of, and the next model is counted on top)."""
    import ctypes
    import gc
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):      # not glibc: nothing to hand back this way
        pass


def memory_budget(max_memory, device: torch.device) -> int:
    """Bytes a run may use: ``--max-memory`` when given, else what the machine (or the GPU) has."""
    return parse_size(max_memory) if max_memory is not None else machine_memory(device)


def available_cores(cgroup_cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """CPU cores this process may use: its affinity mask, capped by a cgroup v2 CPU quota."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = open(cgroup_cpu_max).read().split()[:2]
        if quota != "max":
            n = min(n, max(1, -(-int(quota) // int(period))))          # ceil(quota / period)
    except (OSError, ValueError):
        pass
    return max(1, n)


def set_threads() -> int:
    """torch's intra-op threads = the cores available, unless OMP_NUM_THREADS says otherwise
    (a container's quota is not what torch sees by default); -> the threads in use."""
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(available_cores())
    return torch.get_num_threads()
