"""K-quant super-blocks (gguf.requantize=true): ggml's own dequantization (gguf-py) of our bytes
gives back weights built exactly on a K-quant grid, and Gaussian weights within the usual error."""
import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize
from hypothesis import given, settings, strategies as st

from onecomp_plugin_gguf.kquants import BYTES, QK, encode_k


def _ggml(raw: np.ndarray, kind: str, shape) -> torch.Tensor:
    return torch.from_numpy(dequantize(raw, getattr(gguf.GGMLQuantizationType, kind)).copy()).reshape(shape)


def _on_grid(kind: str, rows: int, g: torch.Generator) -> torch.Tensor:
    """Weights exactly on a K-quant grid whose min/max fit recovers the same parameters."""
    sub, qmax, smax = {"Q2_K": (16, 3, 15), "Q4_K": (32, 15, 63), "Q3_K": (16, 7, 32)}[kind]
    nsub = QK // sub
    n = rows * (512 // QK)
    d = torch.rand(n, 1, generator=g).add(0.5).mul(1e-2).half().float()
    q = torch.randint(0, qmax + 1, (n, nsub, sub), generator=g)
    q[..., 0], q[..., 1] = 0, qmax                                   # every sub-block spans the whole grid
    if kind == "Q3_K":                                               # w = d sc (q - 4), sc in -32..31
        sc = torch.randint(-32, 32, (n, nsub), generator=g)
        sc[sc == 0] = -1
        sc[:, 0] = -32                                               # the largest |scale| sets d exactly
        return (d[..., None] * sc[..., None] * (q - 4)).reshape(rows, -1)
    sc = torch.randint(1, smax + 1, (n, nsub), generator=g)
    m = torch.randint(0, smax + 1, (n, nsub), generator=g)
    sc[:, 0], m[:, 1] = smax, smax
    m = torch.minimum(m, sc)                                         # max >= 0, so the fit's clamps do nothing
    m[:, 1] = smax
    sc[:, 1] = smax
    dmin = d
    return (d[..., None] * sc[..., None] * q - (dmin * m)[..., None]).reshape(rows, -1)


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(["Q2_K", "Q3_K", "Q4_K"]), st.integers(0, 10_000), st.integers(1, 4))
def test_weights_on_a_k_grid_come_back_from_ggml_exactly(kind, seed, rows):
    W = _on_grid(kind, rows, torch.Generator().manual_seed(seed))
    raw = encode_k(W, kind)
    assert raw.dtype == np.uint8 and raw.shape == (rows, W.shape[1] // QK * BYTES[kind])
    back = _ggml(raw, kind, W.shape)
    assert torch.allclose(back, W, rtol=0, atol=1e-6 * float(W.abs().max())), float((back - W).abs().max())


@pytest.mark.parametrize("kind, bound", [("Q2_K", 0.4), ("Q3_K", 0.2), ("Q4_K", 0.1)])
def test_gaussian_weights_within_the_usual_error(kind, bound):
    W = torch.randn(16, 768, generator=torch.Generator().manual_seed(0))
    back = _ggml(encode_k(W, kind), kind, W.shape)
    assert float((back - W).norm() / W.norm()) < bound


def test_rows_must_be_whole_super_blocks():
    with pytest.raises(ValueError, match="whole number of 256"):
        encode_k(torch.zeros(2, 576), "Q4_K")
