import torch
from hypothesis import given, settings, strategies as st

from onecomp_core.formats import grid
from onecomp_core.formats.uniform import UniformFormat
from onecomp_core.plugins import load_plugins
from onecomp_core.spec import LayerSpec
from onecomp_plugin_example.plugin import Rescale
from onecomp_plugin_example.rescale import layer_error, row_factors


def test_found_by_name_through_entry_point():
    ps = load_plugins()
    cls = ps.registry.get("refiner", "rescale")
    assert cls is Rescale
    assert ps.registry.source("refiner", "rescale") == "example"


def test_factor_is_least_squares_optimum():
    torch.manual_seed(0)
    t, wq = torch.randn(4, 16), torch.randn(4, 16)
    X = torch.randn(16, 64)
    H = X @ X.T / 64
    a = row_factors(t, wq, H, -100.0, 100.0)
    for da in (-1e-2, 1e-2):
        assert torch.all(layer_error(t, wq * a[:, None], H) <= layer_error(t, wq * (a + da)[:, None], H))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([2, 3, 4]), st.sampled_from([8, 16, -1]))
def test_never_worse_than_projection(seed, bits, group):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(8, 32, generator=g)
    X = torch.randn(32, 128, generator=g) * torch.rand(32, 1, generator=g) * 3
    H = X @ X.T / 128
    spec = LayerSpec(name="l", bits=bits, group_size=group)
    fmt = UniformFormat()
    qt = fmt.make(*grid.rtn(W, bits, group, False), spec)

    class Ctx:
        pass
    ctx = Ctx()
    ctx.H, ctx.target, ctx.spec = H, W, spec
    out = Rescale().after_projection(ctx, qt)
    before = layer_error(W, qt.dequantize(), H)
    after = layer_error(W, out.dequantize(), H)
    assert torch.all(after <= before + 1e-5 * before.abs())
    assert torch.equal(out.codes, qt.codes)
