import pytest
import torch
from hypothesis import given, settings, strategies as st

from onecomp_core.errors import OnecompError
from onecomp_core.formats import grid
from onecomp_core.formats.uniform import QuantLinear, UniformFormat, disk_group_size
from onecomp_core.spec import LayerSpec

fmt = UniformFormat()


def make(bits, group, sym, shape=(6, 100), seed=0):
    torch.manual_seed(seed)
    W = torch.randn(*shape)
    spec = LayerSpec(name="m", bits=bits, group_size=group, symmetric=sym)
    return fmt.make(*grid.rtn(W, bits, group, sym), spec), spec


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), group=st.sampled_from([32, 64, 128, -1]), sym=st.booleans(),
       cols=st.sampled_from([32, 100, 128, 576, 1536]), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_disk_round_trip(bits, group, sym, cols, dtype):
    qt, spec = make(bits, group, sym, (5, cols))
    if dtype == torch.bfloat16:
        qt.scale = qt.scale.bfloat16().float()
    tensors = fmt.to_tensors("m", qt, dtype)
    assert tensors["m.weight_packed"].dtype == torch.int32
    assert cols % (disk_group_size(cols, group) if group != -1 else cols) == 0
    back = fmt.from_tensors("m", tensors, {"bits": bits, "group_size": group, "symmetric": sym})
    assert torch.equal(back.codes, qt.codes)
    assert torch.equal(back.scale, qt.scale)
    assert torch.equal(back.zero, qt.zero)
    assert torch.equal(back.dequantize(), qt.dequantize())


def test_bits_per_weight_counts_codes_and_metadata():
    spec = LayerSpec(name="m", bits=4, group_size=128, symmetric=False)
    assert fmt.bits_per_weight(spec, (10, 256)) == pytest.approx(4 + (16 + 4) / 128)
    spec = LayerSpec(name="m", bits=3, group_size=128, symmetric=True)
    # 576 = 4.5 x 128: five groups per row
    assert fmt.bits_per_weight(spec, (2, 576)) == pytest.approx(3 + 5 * 16 / 576)
    spec = LayerSpec(name="m", bits=8, group_size=-1, symmetric=True)
    assert fmt.bits_per_weight(spec, (4, 64)) == pytest.approx(8 + 16 / 64)


@pytest.mark.parametrize("bits", [0, 1, 9, 17])
def test_format_refuses_bits_outside_2_to_8(bits):
    with pytest.raises(OnecompError, match="2 to 8 bits"):
        fmt.check(LayerSpec(name="m", bits=bits), (4, 4))


def test_quant_linear_matches_dense_and_trains_in_place():
    qt, _ = make(3, 32, False, (8, 100))
    bias = torch.randn(8)
    lin = QuantLinear(qt, bias)
    x = torch.randn(2, 5, 100)
    ref = torch.nn.functional.linear(x, qt.dequantize(), bias)
    assert torch.allclose(lin(x), ref, atol=1e-5)
    # scales are parameters a refiner can train; codes through a straight-through estimator
    lin.train_codes()
    lin(x).pow(2).sum().backward()
    assert lin.scale.grad is not None and lin.scale.grad.abs().sum() > 0
    assert lin.code_latent.grad is not None and lin.code_latent.grad.abs().sum() > 0
    assert torch.equal(lin.to_tensor().codes, qt.codes)
