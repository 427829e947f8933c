"""The binary-factor formats. ``dbf`` (envelope rank l = 1) lives here; ``mdbf`` (l > 1, in
onecomp-plugin-mdbf) subclasses it.

Disk layout of a module P: ``P.sign_a`` (out x ceil(k/8) uint8) and ``P.sign_b`` (in x
ceil(k/8) uint8), the signs of L and R packed 8 per byte; ``P.env_a`` (out x l), ``P.env_p``
(k x l), ``P.env_b`` (in x l), ``P.env_g`` (k x l) in fp16; ``P.bf_shape`` = (out, in, k, l).
Bits per weight: (k (out + in) + 16 l (out + in + 2k)) / (out in), exactly what is stored.
"""
from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

from onecomp_core.sdk import Format, TrainableView, smooth_sign, stored_float

from .factors import bits_per_weight, compose, rank_for_bpw
from .signs import pack_signs, unpack_signs


@attrs.define
class BinaryFactorTensor:
    Sa: torch.Tensor   # (out, k) +-1
    A: torch.Tensor    # (out, l)
    P: torch.Tensor    # (k, l)
    Sb: torch.Tensor   # (in, k) +-1
    B: torch.Tensor    # (in, l)
    G: torch.Tensor    # (k, l)

    @property
    def shape(self):
        return (self.Sa.shape[0], self.Sb.shape[0])

    @property
    def k(self) -> int:
        return self.Sa.shape[1]

    @property
    def l(self) -> int:
        return self.A.shape[1]

    def factors(self):
        return compose(self.Sa, self.A.float(), self.P.float()), compose(self.Sb, self.B.float(), self.G.float())

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        L, R = self.factors()
        return (L @ R.T).to(dtype)


class BinaryFactorLinear(torch.nn.Module):
    """y = L (R^T x): two matmuls through the rank-k factors (never the dense weight), the
    envelopes as trainable parameters; :meth:`train_signs` makes the signs trainable through a
    straight-through estimator. Without gradients, L and R are kept between calls only for short
    inputs (decoding): making them costs ~(l + 1) / rows of the matmuls' work, and keeping them
    costs ~4 bytes per sign, more than the model's float32 dense weights at 1.5 bpw."""
    onecomp_quantized = True
    cache_rows = 16          # inputs of at most this many rows (tokens: decoding) reuse L and R

    def __init__(self, t: BinaryFactorTensor, bias=None):
        super().__init__()
        self.out_features, self.in_features = t.shape
        self.register_buffer("sign_a", t.Sa.to(torch.int8))
        self.register_buffer("sign_b", t.Sb.to(torch.int8))
        self.A, self.P = torch.nn.Parameter(t.A.float().clone()), torch.nn.Parameter(t.P.float().clone())
        self.B, self.G = torch.nn.Parameter(t.B.float().clone()), torch.nn.Parameter(t.G.float().clone())
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone())
        self.latent_a = self.latent_b = None
        self._cache = None

    def train_signs(self):
        self.latent_a = torch.nn.Parameter(self.sign_a.float() * 0.5)
        self.latent_b = torch.nn.Parameter(self.sign_b.float() * 0.5)

    def _signs(self, latent, fixed):
        if latent is None:
            return fixed.float()
        hard = torch.where(latent >= 0, 1.0, -1.0)
        return latent + (hard - latent).detach()          # STE: forward sign, backward identity

    def factors(self):
        L = self._signs(self.latent_a, self.sign_a) * (self.A @ self.P.T)
        R = self._signs(self.latent_b, self.sign_b) * (self.B @ self.G.T)
        return L, R

    def weight_dequantized(self):
        L, R = self.factors()
        return L @ R.T

    def forward(self, x):
        rows = x.numel() // max(1, x.shape[-1])
        if torch.is_grad_enabled() or self.latent_a is not None or rows > self.cache_rows:
            self._cache = None                       # a long input: a short one before it left them
            L, R = self.factors()
        else:
            key = tuple(p._version for p in (self.A, self.P, self.B, self.G)) + (x.dtype,)
            if self._cache is None or self._cache[0] != key:
                L, R = self.factors()
                self._cache = (key, L.to(x.dtype), R.to(x.dtype))
            _, L, R = self._cache
        y = (x @ R.to(x.dtype)) @ L.to(x.dtype).T
        return y if self.bias is None else y + self.bias.to(x.dtype)


class BinaryFactorView(TrainableView):
    """Trainable view of binary factors. ``scales``: the envelopes A, P, B, G (rounded to fp16,
    as stored, in the forward pass); ``codes``: one latent per sign, its sign taken by the smooth
    sign estimator (backward: d tanh(u / tau) / du), starting at the stored signs (+-1)."""

    def __init__(self, t: BinaryFactorTensor):
        super().__init__()
        self.A, self.P = torch.nn.Parameter(t.A.float().clone()), torch.nn.Parameter(t.P.float().clone())
        self.B, self.G = torch.nn.Parameter(t.B.float().clone()), torch.nn.Parameter(t.G.float().clone())
        self.latent_a = torch.nn.Parameter(t.Sa.float().clone())
        self.latent_b = torch.nn.Parameter(t.Sb.float().clone())

    def param_groups(self):
        return {"scales": [self.A, self.P, self.B, self.G], "codes": [self.latent_a, self.latent_b]}

    def _envelopes(self):
        return [stored_float(x, torch.float16) for x in (self.A, self.P, self.B, self.G)]

    def weight(self):
        A, P, B, G = self._envelopes()
        L = smooth_sign(self.latent_a, self.tau) * (A @ P.T)
        R = smooth_sign(self.latent_b, self.tau) * (B @ G.T)
        return L @ R.T

    def write_back(self) -> BinaryFactorTensor:
        with torch.no_grad():
            A, P, B, G = (x.detach().clone() for x in self._envelopes())
            sign = lambda u: torch.where(u >= 0, 1.0, -1.0)
            return BinaryFactorTensor(sign(self.latent_a), A, P, sign(self.latent_b), B, G)


class DBFFormat(Format):
    """Binary factors with rank-one envelopes (DBF): W ~ diag(a) S_a diag(m) S_b^T diag(b)."""
    name = "dbf"
    takes_bpw = True           # a planner passes the per-module budget as spec.options["bpw"]
    fixed_l: int | None = 1

    def envelope_rank(self, spec) -> int:
        return self.fixed_l if self.fixed_l is not None else int(spec.options.get("l", 2))

    def rank(self, spec, shape) -> int:
        out, cols = shape
        return rank_for_bpw(out, cols, float(spec.options["bpw"]), self.envelope_rank(spec))

    def check(self, spec, shape) -> None:
        bpw = spec.options.get("bpw")
        if bpw is None:
            self.fail(f"format {self.name!r} needs a bits-per-weight target: pass --target-bpw X (e.g. 1.5)")
        if self.rank(spec, shape) < 1:
            self.fail(f"{bpw} bits per weight leave no room for a rank-1 factorisation of {spec.name} "
                      f"{tuple(shape)} in format {self.name!r}; raise --target-bpw")

    def bits_per_weight(self, spec, shape) -> float:
        return bits_per_weight(*shape, self.rank(spec, shape), self.envelope_rank(spec))

    def stored_bits_per_weight(self, spec, shape, qt) -> float:
        return bits_per_weight(*shape, qt.k, qt.l)

    def trainable(self, t: BinaryFactorTensor, spec) -> BinaryFactorView:
        return BinaryFactorView(t)

    def structure(self, t: BinaryFactorTensor) -> dict[str, int]:
        return {"k": t.k, "l": t.l}

    def to_tensors(self, prefix, t: BinaryFactorTensor, dtype):
        out, cols = t.shape
        return {f"{prefix}.sign_a": pack_signs(t.Sa), f"{prefix}.sign_b": pack_signs(t.Sb),
                f"{prefix}.env_a": t.A.half(), f"{prefix}.env_p": t.P.half(),
                f"{prefix}.env_b": t.B.half(), f"{prefix}.env_g": t.G.half(),
                f"{prefix}.bf_shape": torch.tensor([out, cols, t.k, t.l], dtype=torch.int64)}

    def from_tensors(self, prefix, tensors, meta) -> BinaryFactorTensor:
        out, cols, k, l = (int(v) for v in tensors[f"{prefix}.bf_shape"])
        return BinaryFactorTensor(unpack_signs(tensors[f"{prefix}.sign_a"], k), tensors[f"{prefix}.env_a"].float(),
                                  tensors[f"{prefix}.env_p"].float(), unpack_signs(tensors[f"{prefix}.sign_b"], k),
                                  tensors[f"{prefix}.env_b"].float(), tensors[f"{prefix}.env_g"].float())

    def make(self, Sa, A, P, Sb, B, G) -> BinaryFactorTensor:
        # envelopes are stored in fp16: round now so the layer error is the stored model's
        return BinaryFactorTensor(Sa, A.half().float(), P.half().float(), Sb, B.half().float(), G.half().float())

    def module(self, t, bias=None):
        return BinaryFactorLinear(t, bias)
