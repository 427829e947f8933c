"""Trainable views: what training sees is exactly what is written back, and the write-back is a
valid tensor of the same format and bits, whatever the parameters became."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from onecomp_core.errors import OnecompError
from onecomp_core.formats import grid
from onecomp_core.formats.base import Format
from onecomp_core.formats.trainable import TrainableLinear, smooth_round, smooth_sign
from onecomp_core.formats.uniform import UniformFormat
from onecomp_core.spec import LayerSpec


def uniform(seed, bits, group, sym, out=6, cols=40, scale_dtype="float16"):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, cols, generator=g) * (torch.rand(1, cols, generator=g) * 3 + 0.1)
    spec = LayerSpec(name="m", bits=bits, group_size=group, symmetric=sym, scale_dtype=scale_dtype)
    fmt = UniformFormat()
    return W, spec, fmt, fmt.make(*grid.rtn(W, bits, group, sym, scale_dtype=spec.torch_scale_dtype), spec)


@pytest.mark.parametrize("sym", [False, True])
def test_the_view_starts_at_the_stored_tensor(sym):
    W, spec, fmt, qt = uniform(0, 3, 16, sym)
    view = fmt.trainable(qt, spec)
    assert torch.equal(view.weight(), qt.dequantize())
    back = view.write_back()
    for k, t in fmt.to_tensors("m", qt, torch.float16).items():
        assert torch.equal(fmt.to_tensors("m", back, torch.float16)[k], t), k


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), bits=st.integers(2, 8), group=st.sampled_from([8, 16, 24, -1]),
       sym=st.booleans(), noise=st.floats(0.0, 20.0), dtype=st.sampled_from(["float16", "bfloat16"]))
def test_write_back_is_on_the_grid_with_the_same_bits(seed, bits, group, sym, noise, dtype):
    W, spec, fmt, qt = uniform(seed, bits, group, sym, scale_dtype=dtype)
    view = fmt.trainable(qt, spec)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():                              # wherever training took the parameters
        for p in (view.codes, view.scale, view.zero):
            p.add_(noise * torch.randn(p.shape, generator=g) * (p.abs().mean() + 1))
    back = view.write_back()
    maxq = 2**bits - 1
    assert back.codes.dtype == torch.uint8 and int(back.codes.max()) <= maxq
    assert torch.equal(back.zero, back.zero.round()) and 0 <= float(back.zero.min()) and float(back.zero.max()) <= maxq
    assert (back.scale > 0).all() and torch.equal(back.scale, back.scale.to(spec.torch_scale_dtype).float())
    if sym:
        assert torch.equal(back.zero, qt.zero)
    a, b = fmt.to_tensors("m", qt, torch.float16), fmt.to_tensors("m", back, torch.float16)
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    assert fmt.stored_bits_per_weight(spec, qt.shape, back) == fmt.stored_bits_per_weight(spec, qt.shape, qt)
    assert torch.equal(view.weight(), back.dequantize())          # trained function == stored function


def test_gradients_reach_scales_zeros_and_codes_and_training_fits():
    W, spec, fmt, qt = uniform(3, 3, 16, False)
    view = fmt.trainable(qt, spec)
    view.set_temperature(0.5)
    groups = view.param_groups()
    assert set(groups) == {"scales", "codes"} and len(groups["scales"]) == 2
    loss = ((view.weight() - W) ** 2).sum()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for ps in groups.values() for p in ps)
    qt.scale = (qt.scale * 1.3).half().float()                # a pivot whose scales are off
    view = fmt.trainable(qt, spec)
    for p in view.param_groups()["codes"]:
        p.requires_grad_(False)
    opt = torch.optim.Adam(view.param_groups()["scales"], lr=1e-2)
    start = float(((qt.dequantize() - W) ** 2).sum())
    for _ in range(200):
        opt.zero_grad()
        ((view.weight() - W) ** 2).sum().backward()
        opt.step()
    assert float(((view.write_back().dequantize() - W) ** 2).sum()) < 0.5 * start


def test_smooth_estimators_are_hard_forward_and_sharpen_with_the_temperature():
    u = torch.tensor([0.02, 0.49, 0.51, 1.8, -0.3], requires_grad=True)
    assert torch.equal(smooth_round(u, 1.0), torch.round(u.detach()))
    grads = []
    for tau in (2.0, 0.1):
        u.grad = None
        smooth_round(u, tau).sum().backward()
        grads.append(u.grad.clone())
    assert grads[1][1] > grads[0][1] and grads[1][0] < grads[0][0]   # near a step: steeper; far: flatter
    s = torch.tensor([0.3, -0.2, 0.0], requires_grad=True)
    assert torch.equal(smooth_sign(s, 1.0), torch.tensor([1.0, -1.0, 1.0]))


def test_a_trainable_linear_computes_with_the_view():
    W, spec, fmt, qt = uniform(5, 4, 8, True)
    bias = torch.randn(W.shape[0])
    lin = TrainableLinear(fmt.trainable(qt, spec), bias)
    x = torch.randn(3, W.shape[1])
    assert torch.allclose(lin(x), x @ qt.dequantize().T + bias)


def test_a_format_without_a_trainable_view_says_what_is_missing():
    class Plain(Format):
        name = "plain"
    with pytest.raises(OnecompError, match=r"format 'plain' has no trainable view: implement Plain.trainable\(qt, spec\)"):
        Plain().trainable(None, LayerSpec(name="m"))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), bits=st.integers(2, 6), sym=st.booleans(), shift=st.floats(-3.0, 3.0))
def test_warm_start_keeps_the_stored_tensor_and_moves_latents_towards_the_weight(seed, bits, sym, shift):
    W, spec, fmt, qt = uniform(seed, bits, 8, sym)
    view = fmt.trainable(qt, spec)
    target = W + shift * W.abs().mean()                      # any FP weight, near the grid or not
    view.warm_start(target)
    assert torch.equal(view.weight(), qt.dequantize())       # the forward value is unchanged
    assert torch.equal(view.write_back().codes, qt.codes)
    q = qt.codes.float()
    assert ((view.codes.detach() - q).abs() <= 0.49 + 1e-4).all()         # float32 at codes up to 63
    from onecomp_core.formats import grid as g
    s, z = (g.expand(t, W.shape[1], 8) for t in (view._scale().detach(), view._zero().detach()))
    u = target / s + z                                       # where the weight lies in grid units
    assert ((view.codes.detach() - q) * (u - q) >= -1e-4).all()   # each latent moved towards it
    far = (u - q).abs() > 0.5 + 1e-4                         # codes chosen away from W's nearest
    assert torch.equal(view.codes.detach()[far], q[far])
