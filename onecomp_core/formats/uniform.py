"""Uniform group-wise integer format (2-8 bits, symmetric or asymmetric, any group size).

On disk each quantized linear ``P`` is stored in compressed-tensors' pack-quantized layout:
``P.weight_packed`` (int32, codes packed densely along in_features), ``P.weight_scale``
(out x G', checkpoint dtype), ``P.weight_zero_point`` (asymmetric only: int32, signed zero
points packed along out_features) and ``P.weight_shape``. compressed-tensors requires the group
size to divide in_features; when it does not (576 = 4.5 x 128), the layer is written with the
group size G' = gcd(in_features, group_size) and each scale repeated, which is exact. onecomp's
own metadata keeps the true group size, and the bit accounting counts the true groups.
"""
from __future__ import annotations

import math

import attrs
import torch
import torch.nn.functional as F

from . import grid
from .base import Format
from .packing import pack_rows, unpack_rows
from .trainable import TrainableView, smooth_round, ste, stored_float
from ..spec import LayerSpec


@attrs.define
class UniformTensor:
    codes: torch.Tensor        # (out, in) uint8 in [0, 2^bits)
    scale: torch.Tensor        # (out, G) float
    zero: torch.Tensor         # (out, G) float, integer valued
    bits: int
    group_size: int            # -1: per-channel
    symmetric: bool
    disk_group: int = 0        # the group it is stored under (0: the format decides; see UniformFormat.settle)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        cols = self.codes.shape[1]
        s = grid.expand(self.scale.float(), cols, self.group_size)
        z = grid.expand(self.zero.float(), cols, self.group_size)
        return grid.dequantize(self.codes.float(), s, z).to(dtype)


class QuantLinear(torch.nn.Module):
    """Linear layer holding uniform-format codes; dequantizes on the fly.

    ``scale`` and ``zero`` are parameters that a refiner can train in place; call
    :meth:`train_codes` to also train the integer codes through a straight-through estimator.
    """

    onecomp_quantized = True
    keep_dense = True                # inference: keep the dequantized weight between calls (False: memory first)

    def __init__(self, qt: UniformTensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = qt.shape
        self.bits, self.group_size, self.symmetric = qt.bits, qt.group_size, qt.symmetric
        self.disk_group = qt.disk_group
        self.register_buffer("codes", qt.codes.to(torch.uint8))
        self.scale = torch.nn.Parameter(qt.scale.float().clone())
        self.zero = torch.nn.Parameter(qt.zero.float().clone(), requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone())
        self.code_latent = None
        self._dense = None           # (weight, versions): inference cache, see forward

    def train_codes(self) -> None:
        """Make the codes trainable: a float latent rounded in the forward pass, with the
        identity as its gradient (straight-through estimator)."""
        self.code_latent = torch.nn.Parameter(self.codes.float())

    def current_codes(self) -> torch.Tensor:
        if self.code_latent is None:
            return self.codes.float()
        lat = self.code_latent.clamp(0, 2**self.bits - 1)
        return lat + (torch.round(lat) - lat).detach()     # STE: forward round, backward identity

    def weight_dequantized(self) -> torch.Tensor:
        s = grid.expand(self.scale, self.in_features, self.group_size)
        z = grid.expand(self.zero, self.in_features, self.group_size)
        return s * (self.current_codes() - z)

    def to_tensor(self) -> UniformTensor:
        """The current state as a format tensor (codes rounded, zero kept integer)."""
        codes = self.current_codes().detach().round().clamp(0, 2**self.bits - 1).to(torch.uint8)
        return UniformTensor(codes, self.scale.detach().float(), self.zero.detach().round().float(),
                             self.bits, self.group_size, self.symmetric, self.disk_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or self.code_latent is not None or not self.keep_dense:
            self._dense = None if not self.keep_dense else self._dense
            w = self.weight_dequantized().to(x.dtype)
        else:   # inference: dequantize once, again only if the scales or zeros changed in place
            key = (self.scale._version, self.zero._version, x.dtype, self.scale.device)
            if self._dense is None or self._dense[1] != key:
                self._dense = (self.weight_dequantized().to(x.dtype), key)
            w = self._dense[0]
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        g = "channel" if self.group_size == -1 else self.group_size
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={g}, "
                f"{'sym' if self.symmetric else 'asym'}")


class UniformView(TrainableView):
    """Trainable view of a uniform tensor. ``scales``: the per-group scales (rounded to their
    16-bit dtype in the forward pass) and, asymmetric, the zero points (rounded to integers in
    the forward pass, identity gradient); ``codes``: one latent per weight, rounded by the
    smooth straight-through estimator and clamped to [0, 2^b - 1]. A per-group clipping factor
    would multiply a fixed scale, so training the scale itself covers it."""

    def __init__(self, qt: UniformTensor, scale_dtype: torch.dtype):
        super().__init__()
        self.bits, self.group_size, self.symmetric = qt.bits, qt.group_size, qt.symmetric
        self.disk_group = qt.disk_group
        self.maxq = 2**qt.bits - 1
        self.scale_dtype = scale_dtype
        self.scale = torch.nn.Parameter(qt.scale.float().clone())
        self.zero = torch.nn.Parameter(qt.zero.float().clone(), requires_grad=not qt.symmetric)   # asymmetric only
        self.codes = torch.nn.Parameter(qt.codes.float().clone())

    def param_groups(self):
        return {"scales": [self.scale] + ([] if self.symmetric else [self.zero]), "codes": [self.codes]}

    def _scale(self):
        return stored_float(self.scale.clamp_min(torch.finfo(self.scale_dtype).tiny), self.scale_dtype)

    def _zero(self):
        if self.symmetric:                # the grid's middle, fixed by the format
            return torch.full_like(self.scale.detach(), 2 ** (self.bits - 1))
        return ste(self.zero, torch.clamp(torch.round(self.zero.detach()), 0, self.maxq))

    def warm_start(self, weight):
        """Code latents at W / s + z where that lies in the stored code's rounding cell (the code
        is W's nearest), clamped to 0.49 of it: the stored tensor is unchanged, and a weight
        rounded by almost half a step sits near its cell's edge. Codes a projector chose away
        from W's nearest (GPTQ's error feedback) keep their latent at the cell's centre: that
        choice was deliberate and should not be the first to flip."""
        with torch.no_grad():
            cols = self.codes.shape[1]
            s = grid.expand(self._scale(), cols, self.group_size)
            z = grid.expand(self._zero(), cols, self.group_size)
            q = self.codes.detach().round()
            d = weight.float().to(s.device) / s + z - q
            self.codes.copy_(q + torch.where(d.abs() <= 0.5, d.clamp(-0.49, 0.49), torch.zeros_like(d)))

    def weight(self):
        cols = self.codes.shape[1]
        q = torch.clamp(smooth_round(self.codes, self.tau), 0, self.maxq)
        s = grid.expand(self._scale(), cols, self.group_size)
        z = grid.expand(self._zero(), cols, self.group_size)
        return s * (q - z)

    def write_back(self) -> UniformTensor:
        with torch.no_grad():           # exactly the values weight() computes with
            codes = torch.clamp(torch.round(self.codes), 0, self.maxq).to(torch.uint8)
            return UniformTensor(codes, self._scale().detach().clone(), self._zero().detach().clone(), self.bits,
                                 self.group_size, self.symmetric, self.disk_group)


def disk_group_size(in_features: int, group_size: int) -> int:
    """Group size written for compressed-tensors (must divide in_features)."""
    if group_size == grid.PER_CHANNEL or in_features % group_size == 0:
        return group_size
    return math.gcd(in_features, group_size)


COMMON_GROUP_MIN = 32     # the smallest shared disk group worth its extra scales (see settle)


def common_disk_groups(specs, shapes) -> dict[str, int]:
    """{module: disk group} where asymmetric grouped modules of one bit width would otherwise be
    stored under several group sizes: the gcd of their natural disk groups, when it is at least
    COMMON_GROUP_MIN (else nothing is changed)."""
    by_bits: dict[int, dict[str, int]] = {}
    for s in specs:
        if not s.symmetric and s.group_size != grid.PER_CHANNEL:
            by_bits.setdefault(s.bits, {})[s.name] = disk_group_size(shapes[s.name][1], s.group_size)
    out = {}
    for natural in by_bits.values():
        common = math.gcd(*natural.values())
        if len(set(natural.values())) > 1 and common >= COMMON_GROUP_MIN:
            out.update(dict.fromkeys(natural, common))
    return out


class UniformFormat(Format):
    name = "uniform"
    min_bits, max_bits = 2, 8

    def __init__(self, options=None):
        super().__init__(options)
        self.disk_groups: dict[str, int] = {}

    def settle(self, specs, shapes) -> None:
        """One compressed-tensors scheme per bit width where zero points are stored:
        transformers 5.24 dequantizes every module at load with the first scheme of the config,
        so asymmetric modules whose natural disk groups differ (a group size that does not
        divide every input width, e.g. 128 on SmolLM2's 576 and 1536) all store the common
        divisor (64 there; scales and zero points repeated, ~0.16 bpw more on disk for the
        modules that had 128). The report's bits per weight stay those of the group size asked."""
        self.disk_groups = common_disk_groups(specs, shapes)

    def _disk_group(self, name: str, cols: int, g: int, qt: UniformTensor | None = None) -> int:
        """A tensor read from a checkpoint keeps its layout; else the plan's shared group; else gcd."""
        return (qt.disk_group if qt is not None else 0) or self.disk_groups.get(name) or disk_group_size(cols, g)

    def check(self, spec: LayerSpec, shape) -> None:
        if not self.min_bits <= spec.bits <= self.max_bits:
            self.fail(f"format 'uniform' holds {self.min_bits} to {self.max_bits} bits, got bits={spec.bits} "
                      f"for {spec.name}; choose bits in that range (or a binary-factor format below 2 bits)")
        if spec.group_size != grid.PER_CHANNEL and spec.group_size <= 0:
            self.fail(f"group size must be a positive integer or -1 (per-channel), got {spec.group_size}")

    def storage_note(self, spec: LayerSpec, shape) -> str | None:
        """What the checkpoint stores when the group size does not divide the inputs (the
        compressed-tensors layout needs a divisor: groups of gcd, scales repeated)."""
        cols = shape[1]
        g = spec.group_size
        if g == grid.PER_CHANNEL or cols % g == 0:
            return None
        if g > cols:
            return (f"group size {g} is larger than the {cols} inputs of {spec.name}: each row is one group "
                    f"(as with -1, per-channel), and the report counts {self.bits_per_weight(spec, shape):.2f} bpw")
        dg = disk_group_size(cols, g)
        return (f"group size {g} does not divide the {cols} inputs of {spec.name}: the checkpoint stores groups of "
                f"{dg} (each scale repeated {g // dg} times) and the report counts {self.bits_per_weight(spec, shape):.2f} "
                f"bpw; a divisor of {cols} avoids it")

    def bits_per_weight(self, spec: LayerSpec, shape) -> float:
        out, cols = shape
        groups = out * grid.num_groups(cols, spec.group_size)
        meta_bits = 16 + (0 if spec.symmetric else spec.bits)          # fp16 scale + integer zero
        return (out * cols * spec.bits + groups * meta_bits) / (out * cols)

    def make(self, codes, scale, zero, spec: LayerSpec) -> UniformTensor:
        return UniformTensor(codes.to(torch.uint8), scale.float(), zero.float(), spec.bits,
                             spec.group_size, spec.symmetric)

    # -- disk layout (compressed-tensors pack-quantized) --------------------------------------
    def to_tensors(self, prefix: str, qt: UniformTensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        out, cols = qt.shape
        g = qt.group_size
        dg = self._disk_group(prefix, cols, g, qt)
        rep = 1 if g == grid.PER_CHANNEL else g // dg
        scale = qt.scale.repeat_interleave(rep, dim=1)
        if g != grid.PER_CHANNEL:
            scale = scale[:, : cols // dg]
        t = {
            f"{prefix}.weight_packed": pack_rows(qt.codes, qt.bits),
            f"{prefix}.weight_scale": scale.to(dtype).contiguous(),
            f"{prefix}.weight_shape": torch.tensor([out, cols], dtype=torch.int64),
        }
        if not qt.symmetric:
            zero = qt.zero.repeat_interleave(rep, dim=1)[:, : scale.shape[1]].to(torch.int64)
            t[f"{prefix}.weight_zero_point"] = pack_rows(zero.t().contiguous(), qt.bits).t().contiguous()
        return t

    def from_tensors(self, prefix: str, tensors: dict[str, torch.Tensor], meta: dict) -> UniformTensor:
        out, cols = (int(v) for v in tensors[f"{prefix}.weight_shape"])
        bits, g, sym = int(meta["bits"]), int(meta["group_size"]), bool(meta["symmetric"])
        codes = unpack_rows(tensors[f"{prefix}.weight_packed"], bits, cols)
        stored = tensors[f"{prefix}.weight_scale"]
        dg = cols // stored.shape[1]                     # the group it was stored under (settle may share one)
        step = 1 if g == grid.PER_CHANNEL else g // dg
        scale = stored.float()[:, ::step]
        if sym:
            zero = torch.full_like(scale, 2 ** (bits - 1))
        else:
            zp = tensors[f"{prefix}.weight_zero_point"]
            zero = unpack_rows(zp.t().contiguous(), bits, out).t().float()[:, ::step]
        return UniformTensor(codes, scale, zero, bits, g, sym, 0 if g == grid.PER_CHANNEL else dg)   # kept on write-back

    def module(self, qt: UniformTensor, bias=None) -> QuantLinear:
        return QuantLinear(qt, bias)

    def trainable(self, qt: UniformTensor, spec: LayerSpec) -> UniformView:
        return UniformView(qt, spec.torch_scale_dtype)

    def checkpoint_config(self, entries: dict[str, dict]) -> dict:
        """compressed-tensors ``quantization_config``: one config group per distinct scheme,
        targeting its modules by anchored regex (mixed precision is several groups)."""
        import re
        schemes: dict[tuple, list[str]] = {}
        for name, meta in entries.items():
            cols = int(meta["shape"][1])
            g = self._disk_group(name, cols, int(meta["group_size"]))
            key = (int(meta["bits"]), bool(meta["symmetric"]), g)
            schemes.setdefault(key, []).append(f"re:^{re.escape(name)}$")
        groups = {}
        for i, ((bits, sym, g), targets) in enumerate(sorted(schemes.items())):
            weights = {"num_bits": bits, "type": "int", "symmetric": sym, "dynamic": False,
                       "strategy": "channel" if g == grid.PER_CHANNEL else "group",
                       "group_size": None if g == grid.PER_CHANNEL else g, "observer": "minmax"}
            groups[f"group_{i}"] = {"targets": targets, "weights": weights, "input_activations": None,
                                    "output_activations": None, "format": "pack-quantized"}
        config = {"quant_method": "compressed-tensors", "format": "pack-quantized",
                  "quantization_status": "compressed", "config_groups": groups, "ignore": [],
                  "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": {},
                  "global_compression_ratio": None}
        if not all(sym for _, sym, _ in schemes):
            # compressed-tensors 0.20's compress of an empty (meta) model leaves asymmetric zero
            # points unpacked, [out, groups], so transformers >= 5.2x building its compressed
            # modules refuses the packed [out * bits / 32, groups] ones on disk (vLLM expects those);
            # dequantize=True makes transformers unpack each module as it loads instead (dense
            # weights in the scales' dtype); compressed-tensors and vLLM ignore the key
            config["dequantize"] = True
        return config
