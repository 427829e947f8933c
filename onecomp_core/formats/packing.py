"""Dense bit packing of b-bit unsigned codes into int32 words.

Element i of a row occupies bits [i*b, (i+1)*b) of the row's little-endian bit stream; 32
elements fill exactly b words. This is the layout of compressed-tensors' pack-quantized
format (which stores signed values offset by 2^(b-1), i.e. exactly these unsigned codes).
"""
from __future__ import annotations

import math

import torch

_SHIFTS = torch.arange(32, dtype=torch.int64)


def packed_width(cols: int, bits: int) -> int:
    return math.ceil(cols * bits / 32)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, cols) unsigned codes in [0, 2^bits) -> (rows, ceil(cols*bits/32)) int32."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in [1, 8], got {bits}")
    rows, cols = codes.shape
    v = codes.to(torch.int64)
    if v.numel() and (v.min() < 0 or v.max() >= (1 << bits)):
        raise ValueError(f"codes outside [0, {1 << bits}) cannot be packed in {bits} bits")
    pad = (-cols) % 32
    v = torch.nn.functional.pad(v, (0, pad)).reshape(rows, -1, 32)            # (r, n32, 32)
    bitplanes = (v.unsqueeze(-1) >> torch.arange(bits)) & 1                   # (r, n32, 32, b)
    stream = bitplanes.reshape(rows, -1, bits, 32)                             # b words x 32 bits
    words = (stream << _SHIFTS.to(v.device)).sum(-1)                           # (r, n32, b) in [0, 2^32)
    words = torch.where(words >= 2**31, words - 2**32, words)                  # two's complement
    return words.reshape(rows, -1)[:, : packed_width(cols, bits)].to(torch.int32).contiguous()


def unpack_rows(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: -> (rows, cols) uint8 codes."""
    rows, nwords = packed.shape
    if nwords != packed_width(cols, bits):
        raise ValueError(f"packed width {nwords} does not hold {cols} columns of {bits} bits")
    n32 = math.ceil(cols / 32)
    w = packed.to(torch.int64) & 0xFFFFFFFF
    w = torch.nn.functional.pad(w, (0, n32 * bits - nwords)).reshape(rows, n32, bits, 1)
    stream = (w >> _SHIFTS.to(w.device)) & 1                                   # (r, n32, b, 32)
    bitplanes = stream.reshape(rows, n32, 32, bits)
    values = (bitplanes << torch.arange(bits, device=w.device)).sum(-1)
    return values.reshape(rows, -1)[:, :cols].to(torch.uint8)
