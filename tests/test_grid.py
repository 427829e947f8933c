import math

import torch
from hypothesis import given, settings, strategies as st

from onecomp_core.formats import grid


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), cols=st.integers(1, 150), group=st.sampled_from([-1, 8, 32, 64, 128]),
       sym=st.booleans(), mse=st.sampled_from([0, 20]), seed=st.integers(0, 2**16))
def test_codes_lie_on_the_grid(bits, cols, group, sym, mse, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(4, cols, generator=g) * torch.rand(4, 1, generator=g) * 3
    codes, scale, zero = grid.rtn(W, bits, group, sym, mse_steps=mse)
    assert codes.dtype == torch.uint8 and codes.shape == W.shape
    assert int(codes.max()) <= 2**bits - 1
    assert scale.shape == zero.shape == (4, grid.num_groups(cols, group))
    assert torch.equal(zero, zero.round()) and float(zero.min()) >= 0 and float(zero.max()) <= 2**bits - 1
    assert torch.equal(scale.half().float(), scale)          # 16-bit scales, as accounted
    if sym:
        assert torch.all(zero == 2 ** (bits - 1))
    Wq = grid.dequantize(codes.float(), grid.expand(scale, cols, group), grid.expand(zero, cols, group))
    if mse == 0:
        # half a step of rounding (a whole one at the clipped top of the symmetric grid), plus
        # the range lost to rounding the scale to fp16 (relative 2^-11, times 2^b steps)
        step = grid.expand(scale, cols, group)
        bound = step * ((1.0 if sym else 0.5) + 2**bits / 2048) + 1e-6
        assert torch.all((W - Wq).abs() <= bound)


def test_partial_last_group():
    W = torch.randn(3, 576)
    codes, scale, zero = grid.rtn(W, 4, 128, False)
    assert scale.shape == (3, 5)                   # 4 full groups + one of 64
    lone = grid.rtn(W[:, 512:], 4, 128, False)
    assert torch.equal(scale[:, 4], lone[1][:, 0])
    assert math.ceil(576 / 128) == grid.num_groups(576, 128)


def test_mse_grid_never_worse_than_minmax():
    torch.manual_seed(0)
    W = torch.randn(16, 256)
    W[:, 0] *= 20                                                  # an outlier per row
    def err(**kw):
        c, s, z = grid.rtn(W, 3, 64, False, **kw)
        return float((grid.dequantize(c.float(), grid.expand(s, 256, 64), grid.expand(z, 256, 64)) - W).abs().pow(2.4).sum())
    assert err(mse_steps=100) <= err()


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 3, 4]), cols=st.integers(1, 80), group=st.sampled_from([8, 16, 32]),
       sym=st.booleans(), mse=st.sampled_from([0, 10]), seed=st.integers(0, 100))
def test_groups_fitted_together_equal_each_group_fitted_alone(bits, cols, group, sym, mse, seed):
    W = torch.randn(6, cols, generator=torch.Generator().manual_seed(seed))
    s, z = grid.fit_groups(W, bits, group, sym, mse_steps=mse)
    G = grid.num_groups(cols, group)
    assert s.shape == z.shape == (6, G)
    for g in range(G):
        sg, zg = grid.fit(W[:, g * group:(g + 1) * group], bits, sym, mse_steps=mse)
        assert torch.equal(s[:, g], sg) and torch.equal(z[:, g], zg), g
