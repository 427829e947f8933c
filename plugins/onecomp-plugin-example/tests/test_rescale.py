import torch
from hypothesis import given, settings, strategies as st

import onecomp_core
from onecomp_core.sdk import LayerSpec, UniformFormat, grid, load_plugins
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


def test_end_to_end_lowers_every_layer_error(tiny_llama, tmp_path):
    kw = dict(bits=3, group_size=32, projector="rtn", num_samples=4, seq_len=32)
    plain = onecomp_core.quantize(tiny_llama, tmp_path / "a", **kw)
    res = onecomp_core.quantize(tiny_llama, tmp_path / "b", refiners=["rescale"], **kw)
    first = [n for n in res["layers"] if ".layers.0.self_attn." in n and n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj")]
    # block 0's first group sees the same inputs in both runs: rescale only lowers its H-weighted error
    for n in first:
        assert res["layers"][n]["rel_error"] <= plain["layers"][n]["rel_error"] * (1 + 1e-6), n
