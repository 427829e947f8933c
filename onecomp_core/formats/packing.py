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


def pack_rows(codes: torch.Tensor, bits: int, chunk: int = 512) -> torch.Tensor:
    """(rows, cols) unsigned codes in [0, 2^bits) -> (rows, ceil(cols*bits/32)) int32."""
    if codes.shape[0] > chunk:   # bound the temporaries
        return torch.cat([pack_rows(codes[r:r + chunk], bits, chunk) for r in range(0, codes.shape[0], chunk)])
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


def unpack_rows(packed: torch.Tensor, bits: int, cols: int, chunk: int = 512) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: -> (rows, cols) uint8 codes. Element i is read from bit
    i*b: the low part from word (i*b)//32, the high part (if it straddles) from the next word.
    Rows are processed in chunks to keep temporaries small."""
    rows, nwords = packed.shape
    if nwords != packed_width(cols, bits):
        raise ValueError(f"packed width {nwords} does not hold {cols} columns of {bits} bits")
    start = torch.arange(cols, device=packed.device, dtype=torch.int64) * bits
    word, off = start // 32, start % 32
    nxt = torch.clamp(word + 1, max=nwords - 1)
    mask = (1 << bits) - 1
    out = torch.empty(rows, cols, dtype=torch.uint8, device=packed.device)
    for r in range(0, rows, chunk):
        w = packed[r:r + chunk].to(torch.int64) & 0xFFFFFFFF
        v = (w[:, word] >> off) | (w[:, nxt] << (32 - off))
        out[r:r + chunk] = (v & mask).to(torch.uint8)
    return out
