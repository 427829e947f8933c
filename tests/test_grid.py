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


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 3, 4]), cols=st.integers(1, 80), group=st.sampled_from([8, 32, -1]),
       sym=st.booleans(), seed=st.integers(0, 100))
def test_weighted_clipping_search(bits, cols, group, sym, seed):
    """Per-column weights d: ones give the unweighted search; grouped fits equal each group fitted
    alone with its columns' weights; and the choice is never worse on sum_j d_j |w_j - w^_j|^2.4
    than the unweighted search's."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(5, cols, generator=g) * 2
    d = torch.rand(cols, generator=g) ** 4 * 10
    s1, z1 = grid.fit_groups(W, bits, group, sym, mse_steps=20)
    sw, zw = grid.fit_groups(W, bits, group, sym, mse_steps=20, weight=torch.ones(cols))
    assert torch.equal(s1, sw) and torch.equal(z1, zw)
    s, z = grid.fit_groups(W, bits, group, sym, mse_steps=20, weight=d)
    size = cols if group == -1 else group
    for k in range(grid.num_groups(cols, group)):
        cs = slice(k * size, (k + 1) * size)
        sg, zg = grid.fit(W[:, cs], bits, sym, mse_steps=20, weight=d[cs])
        assert torch.equal(s[:, k], sg) and torch.equal(z[:, k], zg), k

    def werr(sc, ze):
        q = grid.quantize(W, grid.expand(sc, cols, group), grid.expand(ze, cols, group), bits)
        return ((grid.dequantize(q, grid.expand(sc, cols, group), grid.expand(ze, cols, group)) - W).abs()
                .pow(2.4) * d).sum(1)
    assert torch.all(werr(s, z) <= werr(s1, z1) * (1 + 1e-5) + 1e-6)


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 3, 4]), cols=st.integers(1, 80), group=st.sampled_from([8, 32, -1]),
       sym=st.booleans(), seed=st.integers(0, 100))
def test_output_error_clipping_search(bits, cols, group, sym, seed):
    """With a Gram matrix H: each group is fitted on its own diagonal block (grouped fit = each
    group alone), and the choice is never worse on the group's output error e H_gg e^T than the
    plain search's."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(5, cols, generator=g) * 2
    X = torch.randn(3 * cols + 8, cols, generator=g) * (torch.rand(cols, generator=g) * 3)
    H = X.T @ X / X.shape[0]
    s1, z1 = grid.fit_groups(W, bits, group, sym, mse_steps=20)
    s, z = grid.fit_groups(W, bits, group, sym, mse_steps=20, gram=H)
    size = cols if group == -1 else group
    for k in range(grid.num_groups(cols, group)):
        cs = slice(k * size, (k + 1) * size)
        sg, zg = grid.fit(W[:, cs], bits, sym, mse_steps=20, gram=H[cs, cs][None])
        assert torch.equal(s[:, k], sg) and torch.equal(z[:, k], zg), k

        def oerr(sc, ze):
            q = grid.quantize(W[:, cs], sc[:, k:k + 1], ze[:, k:k + 1], bits)
            e = grid.dequantize(q, sc[:, k:k + 1], ze[:, k:k + 1]) - W[:, cs]
            return ((e @ H[cs, cs]) * e).sum(1)
        assert torch.all(oerr(s, z) <= oerr(s1, z1) * (1 + 1e-4) + 1e-6), k
