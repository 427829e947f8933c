"""Sign matrices packed 8 per byte along the last dimension (bit set = +1)."""
from __future__ import annotations

import torch

_W = (2 ** torch.arange(8)).to(torch.uint8)


def pack_signs(S: torch.Tensor) -> torch.Tensor:
    """(rows, k) of +-1 -> (rows, ceil(k/8)) uint8."""
    rows, k = S.shape
    bits = (S > 0).to(torch.uint8)
    bits = torch.nn.functional.pad(bits, (0, (-k) % 8)).reshape(rows, -1, 8)
    return (bits * _W.to(S.device)).sum(-1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: -> (rows, k) float of +-1."""
    bits = (packed[..., None] & _W.to(packed.device)) > 0
    bits = bits.reshape(packed.shape[0], -1)[:, :k]
    return bits.float() * 2 - 1
