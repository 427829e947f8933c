"""Pure math: ggml's K-quant super-blocks (256 weights) from float weights, for modules whose own
grid GGUF cannot hold (``gguf.requantize=true``). Lossy: the caller reports the error.

Per super-block of 256 weights, with d, dmin float16 and integer sub-block scales:
  Q2_K  16 sub-blocks of 16: w = d sc_j q - dmin m_j, q in 0..3,  sc_j, m_j 4-bit   (84 bytes)
  Q3_K  16 sub-blocks of 16: w = d sc_j q,  q in -4..3, sc_j 6-bit signed (offset 32) (110 bytes)
  Q4_K   8 sub-blocks of 32: w = d sc_j q - dmin m_j, q in 0..15, sc_j, m_j 6-bit   (144 bytes)
Byte layouts as ggml reads them (gguf-py's dequantize is the test oracle):
  Q2_K  scales[16] (sc | m << 4) | qs[64] | d | dmin;  value k = 128 h + 32 s + i sits in
        bits 2s..2s+1 of qs[32 h + i]
  Q3_K  hmask[32] | qs[64] | scales[12] | d;  low two bits of q + 4 as in Q2_K, bit j of hmask[i]
        set when value 32 j + i is >= 0; 6-bit scale j: low nibble in byte j mod 8 (high half
        for j >= 8), top two bits in byte 8 + j mod 4 at bit 2 (j div 4)
  Q4_K  d | dmin | scales[12] | qs[128];  value 64 c + 32 k + i in nibble k of qs[32 c + i];
        6-bit sc_j, m_j: j < 4 in bytes j, j + 4 (low six bits); j >= 4 split over byte j + 4
        (sc low nibble, m high nibble) and the top bits of bytes j - 4 (sc) and j (m)
Sub-block parameters are fitted by min/max (Q2_K, Q4_K) or absolute max (Q3_K), then the codes
are rounded against the stored (quantized) scales.
"""
from __future__ import annotations

import numpy as np
import torch

QK = 256
BYTES = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144}
FOR_BITS = {1: "Q2_K", 2: "Q2_K", 3: "Q3_K", 4: "Q4_K"}      # the K-quant for a grid of b bits


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).float()


def _f16_bytes(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.float16).numpy().view(np.uint8).reshape(-1, 2)


def _affine(x: torch.Tensor, sub: int, qmax: int, smax: int):
    """w = d sc q - dmin m per sub-block of ``sub``: -> (d, dmin (n,), sc, m (n, S) ints, q (n, 256))."""
    n = x.shape[0]
    xs = x.reshape(n, -1, sub)
    lo = xs.amin(-1).clamp(max=0)
    hi = xs.amax(-1).clamp(min=0)
    scale, mn = (hi - lo) / qmax, -lo
    d = _f16(scale.amax(-1) / smax)
    dmin = _f16(mn.amax(-1) / smax)
    sc = torch.where(d[:, None] > 0, torch.round(scale / d[:, None].clamp_min(1e-30)), 0).clamp(0, smax)
    m = torch.where(dmin[:, None] > 0, torch.round(mn / dmin[:, None].clamp_min(1e-30)), 0).clamp(0, smax)
    step = (d[:, None] * sc)[..., None]
    q = torch.where(step > 0, torch.round((xs + (dmin[:, None] * m)[..., None]) / step.clamp_min(1e-30)), 0)
    return d, dmin, sc.to(torch.int64), m.to(torch.int64), q.clamp(0, qmax).to(torch.int64).reshape(n, QK)


def _two_bit_planes(q2: torch.Tensor) -> torch.Tensor:
    """(n, 256) values 0..3 -> (n, 64) bytes: value 128 h + 32 s + i in bits 2s of byte 32 h + i."""
    v = q2.reshape(-1, 2, 4, 32)
    return (v[:, :, 0] | (v[:, :, 1] << 2) | (v[:, :, 2] << 4) | (v[:, :, 3] << 6)).reshape(-1, 64)


def q2_k(x: torch.Tensor) -> np.ndarray:
    d, dmin, sc, m, q = _affine(x, 16, 3, 15)
    parts = [(sc | (m << 4)).to(torch.uint8).numpy(), _two_bit_planes(q).to(torch.uint8).numpy(),
             _f16_bytes(d), _f16_bytes(dmin)]
    return np.concatenate(parts, axis=1)


def q3_k(x: torch.Tensor) -> np.ndarray:
    n = x.shape[0]
    xs = x.reshape(n, 16, 16)
    at = xs.abs().argmax(-1, keepdim=True)
    scale = -torch.gather(xs, -1, at).squeeze(-1) / 4          # the largest magnitude lands on q = -4
    d = _f16(scale.abs().amax(-1) / 32)
    sc = torch.where(d[:, None] > 0, torch.round(scale / d[:, None].clamp_min(1e-30)), 0).clamp(-32, 31)
    step = (d[:, None] * sc)[..., None]
    q = torch.where(step != 0, torch.round(xs / torch.where(step != 0, step, 1)), 0).clamp(-4, 3)
    q = q.to(torch.int64).reshape(n, QK)
    low = _two_bit_planes((q + 4) & 3)
    hbit = (q >= 0).to(torch.int64).reshape(n, 8, 32)           # bit j of hmask[i]: value 32 j + i
    hmask = sum(hbit[:, j] << j for j in range(8))
    s6 = (sc.to(torch.int64) + 32)                               # 0..63
    packed = torch.zeros(n, 12, dtype=torch.int64)
    for j in range(16):
        packed[:, j % 8] |= (s6[:, j] & 0xF) << (4 * (j // 8))
        packed[:, 8 + j % 4] |= (s6[:, j] >> 4) << (2 * (j // 4))
    parts = [hmask.to(torch.uint8).numpy(), low.to(torch.uint8).numpy(), packed.to(torch.uint8).numpy(),
             _f16_bytes(d)]
    return np.concatenate(parts, axis=1)


def q4_k(x: torch.Tensor) -> np.ndarray:
    n = x.shape[0]
    d, dmin, sc, m, q = _affine(x, 32, 15, 63)
    packed = torch.zeros(n, 12, dtype=torch.int64)
    for j in range(4):
        packed[:, j] = (sc[:, j] & 63) | ((sc[:, j + 4] >> 4) << 6)
        packed[:, j + 4] = (m[:, j] & 63) | ((m[:, j + 4] >> 4) << 6)
        packed[:, j + 8] = (sc[:, j + 4] & 0xF) | ((m[:, j + 4] & 0xF) << 4)
    v = q.reshape(n, 4, 2, 32)
    qs = (v[:, :, 0] | (v[:, :, 1] << 4)).reshape(n, 128)
    parts = [_f16_bytes(d), _f16_bytes(dmin), packed.to(torch.uint8).numpy(), qs.to(torch.uint8).numpy()]
    return np.concatenate(parts, axis=1)


ENCODERS = {"Q2_K": q2_k, "Q3_K": q3_k, "Q4_K": q4_k}


def encode_k(W: torch.Tensor, kind: str) -> np.ndarray:
    """(out, in) float weights, in a multiple of 256 -> uint8 (out, in / 256 * block bytes)."""
    out, cols = W.shape
    if cols % QK:
        raise ValueError(f"{cols} inputs are not a whole number of {QK}-weight super-blocks")
    return ENCODERS[kind](W.float().reshape(-1, QK)).reshape(out, -1)
