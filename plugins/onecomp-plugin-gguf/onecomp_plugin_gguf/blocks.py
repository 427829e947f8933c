"""Pure math: onecomp's uniform codes as ggml blocks of 32 weights, byte for byte.

ggml dequantizes block j of a row as
  Q4_0: w = d (q - 8),        bytes: d (f16) | 16 bytes of nibbles
  Q4_1: w = d q + m,          bytes: d (f16) | m (f16) | 16 bytes of nibbles
  Q8_0: w = d q,  q int8,     bytes: d (f16) | 32 int8
where byte i of the nibbles holds q_i in its low half and q_(i+16) in its high half.
onecomp's uniform grid is w = s (q - z) per group (DESIGN.md, eq. of the uniform format), so a
group that is a whole number of blocks maps exactly: d = s, and q = c - z + 8 (symmetric, z = 8
at 4 bits), m = -s z with q = c (asymmetric), q = c - z (symmetric 8-bit, z = 128). A grid of
fewer bits fits the same way in a wider type (3-bit asymmetric in Q4_1: exact, 5 bits stored).
"""
from __future__ import annotations

import numpy as np
import torch

BLOCK = 32
TYPES = {"Q4_0": (4, True), "Q4_1": (4, False), "Q8_0": (8, True)}     # name -> (bits, symmetric)


def gguf_type(bits: int, symmetric: bool, group_size: int, wider: bool = False) -> str | None:
    """The ggml type that holds a uniform grid exactly, or None (group sizes must be whole blocks;
    -1, one group per row, works where the row is). ``wider``: also a type of more bits than the
    grid's (3-bit asymmetric in Q4_1: exact, but 5 bits stored per weight)."""
    if group_size != -1 and group_size % BLOCK:
        return None
    for name, (b, sym) in TYPES.items():
        if sym == symmetric and (b == bits or wider and bits < b):
            return name
    return None


def _per_block(t: torch.Tensor, cols: int, group_size: int) -> torch.Tensor:
    """(out, G) per-group values -> (out, cols / 32) per-block values."""
    g = cols if group_size == -1 else group_size
    idx = torch.arange(0, cols, BLOCK) // g
    return t[:, idx]


def _f16_bytes(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.float16).numpy().view(np.uint8).reshape(*x.shape, 2)


def encode(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, kind: str) -> np.ndarray:
    """(out, in) codes with (out, G) scales and zero points -> uint8 (out, in / 32 * block bytes)."""
    out, cols = codes.shape
    if cols % BLOCK:
        raise ValueError(f"{cols} inputs are not a whole number of {BLOCK}-weight blocks")
    nb = cols // BLOCK
    d = _per_block(scale.float(), cols, group_size)                    # (out, nb)
    q = codes.to(torch.int16).reshape(out, nb, BLOCK)
    parts = [_f16_bytes(d)]
    if kind == "Q4_1":
        parts.append(_f16_bytes(-d * _per_block(zero.float(), cols, group_size)))      # m = -s z
    if kind == "Q4_0":                                  # w = s (c - z) = d (q - 8): q = c - z + 8
        q = q - _per_block(zero.float(), cols, group_size).to(torch.int16)[..., None] + 8
    if kind in ("Q4_0", "Q4_1"):
        nib = (q[..., :16] | (q[..., 16:] << 4)).to(torch.uint8)
        parts.append(nib.numpy())
    elif kind == "Q8_0":                                # w = d q, q = c - z
        q = q - _per_block(zero.float(), cols, group_size).to(torch.int16)[..., None]
        parts.append(q.to(torch.int8).numpy().view(np.uint8))
    else:
        raise ValueError(f"unknown block type {kind}")
    return np.concatenate(parts, axis=-1).reshape(out, -1)

