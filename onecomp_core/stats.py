"""Calibration statistics as mergeable sums over tokens.

Every statistic here is a sum over calibration tokens plus the token count, so partial sums from
disjoint parts of the calibration set (batches, or data-parallel ranks) combine exactly by
adding: ``a.merge(b)`` equals one pass over both parts, up to float summation order.

- :class:`Gram`      H = X X^T / N            (a linear's input Gram; GPTQ's Hessian up to 2)
- :class:`Cross`     C = (X - X^) X^^T / N    (FP input vs quantized-stream input: QEP)
- :class:`Residual`  R = (h - h^) X^^T / N    (residual-stream error at a writer's add vs its input)
- :class:`Diag`      diag(X X^T) / N          (activation-aware planning without the full Gram)

The scheduler gathers them (:mod:`onecomp_core.gather`) in batches of calibration samples for
what the components declare they need; components only read them.
"""
from __future__ import annotations

import torch

from .errors import OnecompError


class Statistic:
    """A sum over tokens and the number of tokens it holds."""

    kind = "statistic"

    def __init__(self, total: torch.Tensor, n: int = 0):
        self.sum = total
        self.n = int(n)

    @classmethod
    def zeros(cls, *shape: int, device="cpu", dtype=torch.float32) -> "Statistic":
        return cls(torch.zeros(*shape, dtype=dtype, device=device))

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.n, 1)

    def merge(self, other: "Statistic") -> "Statistic":
        """Add another part's sum into this one (in place); returns self."""
        if type(other) is not type(self) or other.sum.shape != self.sum.shape:
            raise OnecompError(f"cannot merge {type(other).__name__}{tuple(other.sum.shape)} into "
                               f"{type(self).__name__}{tuple(self.sum.shape)}")
        self.sum += other.sum.to(self.sum)
        self.n += other.n
        return self

    def state_dict(self) -> dict:
        return {"kind": self.kind, "sum": self.sum, "n": self.n}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Statistic":
        if state.get("kind") != cls.kind:
            raise OnecompError(f"state of a {state.get('kind')!r} statistic, not {cls.kind!r}")
        return cls(state["sum"].clone(), state["n"])


class OuterSum(Statistic):
    """sum over tokens of a b^T (A: rows x N, B: cols x N); tokens arrive as (..., features)."""

    kind = "outer"

    def add_outer(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a = a.reshape(-1, a.shape[-1]).to(self.sum.dtype)
        b = b.reshape(-1, b.shape[-1]).to(self.sum.dtype)
        self.sum.addmm_(a.t(), b)
        self.n += b.shape[0]


PANEL = 512      # rows per panel of a Gram's upper-triangle update


def add_gram_upper(S: torch.Tensor, x: torch.Tensor, panel: int | None = None) -> None:
    """S += x^T x on and above the diagonal blocks only (x: tokens x n): row panels
    S[i0:i1, i0:] += x[:, i0:i1]^T x[:, i0:], (P + 1) / 2P of the full product's work for P
    panels; the entries below them are left stale (see :func:`mirror_upper`)."""
    n = S.shape[0]
    parts = max(1, n // (panel or PANEL))
    edges = [n * k // parts for k in range(parts + 1)]
    for i0, i1 in zip(edges, edges[1:]):
        S[i0:i1, i0:].addmm_(x[:, i0:i1].t(), x[:, i0:])


def mirror_upper(S: torch.Tensor) -> None:
    """S <- triu(S) + triu(S, 1)^T in place: the symmetric matrix the upper triangle says."""
    lower = torch.triu(S, 1).t()
    S.triu_().add_(lower)


class Gram(OuterSum):
    """H = X X^T / N over the inputs a linear sees. Sums the upper triangle only (H is
    symmetric) and mirrors it the first time ``sum`` is read after an ``add``."""

    kind = "gram"

    @property
    def sum(self) -> torch.Tensor:
        if self._stale:
            mirror_upper(self._sum)
            self._stale = False
        return self._sum

    @sum.setter
    def sum(self, total: torch.Tensor) -> None:
        self._sum, self._stale = total, False

    @classmethod
    def of(cls, in_features: int, device="cpu", dtype=torch.float32) -> "Gram":
        return cls.zeros(in_features, in_features, device=device, dtype=dtype)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self._sum.dtype)
        add_gram_upper(self._sum, x)
        self._stale = True
        self.n += x.shape[0]

    @property
    def H(self) -> torch.Tensor:
        return self.mean


class Cross(OuterSum):
    """C = (X - X^) X^^T / N from paired FP / quantized-stream inputs of one linear."""

    kind = "cross"

    @classmethod
    def of(cls, in_features: int, device="cpu", dtype=torch.float32) -> "Cross":
        return cls.zeros(in_features, in_features, device=device, dtype=dtype)

    def add(self, x_fp: torch.Tensor, x_q: torch.Tensor) -> None:
        self.add_outer(x_fp.to(self.sum.dtype) - x_q.to(self.sum.dtype), x_q)

    @property
    def C(self) -> torch.Tensor:
        return self.mean


class Residual(OuterSum):
    """R = (h - h^) X^^T / N: the residual-stream error at a writer's add (out x N) against the
    writer's quantized-stream input (in x N)."""

    kind = "residual"

    @classmethod
    def of(cls, out_features: int, in_features: int, device="cpu", dtype=torch.float32) -> "Residual":
        return cls.zeros(out_features, in_features, device=device, dtype=dtype)

    def add(self, r_fp: torch.Tensor, r_q: torch.Tensor, x_q: torch.Tensor) -> None:
        self.add_outer(r_fp.to(self.sum.dtype) - r_q.to(self.sum.dtype), x_q)

    @property
    def R(self) -> torch.Tensor:
        return self.mean


class Diag(Statistic):
    """diag(X X^T) / N, without forming the outer product."""

    kind = "diag"

    @classmethod
    def of(cls, in_features: int, device="cpu", dtype=torch.float32) -> "Diag":
        return cls.zeros(in_features, device=device, dtype=dtype)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.sum.dtype)
        self.sum += (x * x).sum(0)
        self.n += x.shape[0]


KINDS = {c.kind: c for c in (Gram, Cross, Residual, Diag)}


def from_state_dict(state: dict) -> Statistic:
    """Any statistic back from its ``state_dict()``."""
    try:
        cls = KINDS[state["kind"]]
    except KeyError:
        raise OnecompError(f"unknown statistic kind {state.get('kind')!r}; known: {', '.join(KINDS)}") from None
    return cls.from_state_dict(state)
