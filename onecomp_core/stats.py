"""Per-linear calibration statistics, accumulated online from forward hooks."""
from __future__ import annotations

import torch


class OuterSum:
    """A B^T / N accumulated over tokens (A: rows x N, B: cols x N), kept in float32. Token
    batches arrive as (..., features) tensors."""

    def __init__(self, rows: int, cols: int, device):
        self.sum = torch.zeros(rows, cols, dtype=torch.float32, device=device)
        self.n = 0

    def add_outer(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a = a.reshape(-1, a.shape[-1]).float()
        b = b.reshape(-1, b.shape[-1]).float()
        self.sum.addmm_(a.t(), b)
        self.n += b.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.n, 1)


class GramAccumulator(OuterSum):
    """H = X X^T / N over the inputs a linear sees (X: in x N)."""

    def __init__(self, in_features: int, device):
        super().__init__(in_features, in_features, device)

    def add(self, x: torch.Tensor) -> None:
        self.add_outer(x, x)

    @property
    def H(self) -> torch.Tensor:
        return self.mean


class DiagAccumulator:
    """diag(X X^T) / N over the inputs a linear sees, without forming the outer product."""

    def __init__(self, in_features: int, device):
        self.sum = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.sum += (x * x).sum(0)
        self.n += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.n, 1)


class StopForward(Exception):
    """Raised from a hook once every linear of interest has seen its input."""


class InputCollector:
    """Forward hooks on some linears of a block: feed each input to ``sink(name, x)``; stop the
    block's forward as soon as all of them have run for the current sample (early exit)."""

    def __init__(self, modules: dict[str, torch.nn.Module], sink, stop_early: bool = True):
        self.modules, self.sink, self.stop_early = modules, sink, stop_early
        self.seen: set[str] = set()
        self.handles = []

    def __enter__(self):
        for name, mod in self.modules.items():
            self.handles.append(mod.register_forward_pre_hook(self._hook(name)))
        return self

    def _hook(self, name):
        def hook(mod, args):
            self.sink(name, args[0].detach())
            self.seen.add(name)
            if self.stop_early and len(self.seen) == len(self.modules):
                raise StopForward
        return hook

    def run(self, fn) -> None:
        self.seen = set()
        try:
            fn()
        except StopForward:
            pass

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []


def input_diagonals(sk, inputs: torch.Tensor, kwargs: list[dict]) -> dict[str, torch.Tensor]:
    """diag(X X^T) / N of every quantizable linear's input, from one pass of the FP model over
    the calibration stream, block by block (activation-aware planning)."""
    return input_statistics(sk, inputs, kwargs)


def input_statistics(sk, inputs: torch.Tensor, kwargs: list[dict], reduce=None) -> dict:
    """One pass of the FP model over the calibration stream, block by block. For every
    quantizable linear: diag(X X^T) / N when ``reduce`` is None, else ``reduce(H)`` of its full
    input Gram H = X X^T / N. H is built once per input group (q/k/v, gate/up share it) and
    dropped after ``reduce``, so only one block's Grams are ever held."""
    from .streams import run_block
    out = {}
    h = inputs
    for i in range(len(sk.blocks)):
        block = sk.block(i)
        prefix = sk.block_prefix(i)
        groups = sk.adapter.linear_groups(block)
        heads = {g[0]: g for g in groups}            # one hook per shared input
        kind = GramAccumulator if reduce else DiagAccumulator
        acc = {n: kind(block.get_submodule(n).in_features, h.device) for n in heads}
        with InputCollector({n: block.get_submodule(n) for n in heads}, lambda n, x: acc[n].add(x), stop_early=False):
            h = run_block(block, h, kwargs[i])
        for n, g in heads.items():
            stat = reduce(acc[n].mean) if reduce else acc[n].mean
            stat = stat.cpu() if isinstance(stat, torch.Tensor) else stat
            for m in g:
                out[f"{prefix}.{m}"] = stat
        del acc
        sk.release_block(i)
    return out
