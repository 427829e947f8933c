import torch
from hypothesis import given, settings, strategies as st

from onecomp_core.sdk import grid
from onecomp_plugins_gptq import gptq
from onecomp_plugin_jointq.jointq import jointq, objective, regularised


def inputs(cols, n, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(cols // 3 + 1, n, generator=g)
    X = torch.randn(cols, base.shape[0], generator=g) @ base + 0.1 * torch.randn(cols, n, generator=g)
    return X * (torch.rand(cols, 1, generator=g) * 3)


def dense(c, s, z, group):
    cols = c.shape[1]
    return grid.dequantize(c.float(), grid.expand(s, cols, group), grid.expand(z, cols, group))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), bits=st.integers(2, 4), group=st.sampled_from([16, 48, -1]),
       sym=st.booleans(), lam=st.sampled_from([0.0, 0.1]), start=st.sampled_from(["gptq", "rtn"]))
def test_jointq_never_worse_than_its_start(seed, bits, group, sym, lam, start):
    X = inputs(64, 256, seed)
    H = X @ X.T / 256
    W = torch.randn(12, 64, generator=torch.Generator().manual_seed(seed + 1))
    c0, s0, z0 = gptq(W, H, bits, group, sym) if start == "gptq" else grid.rtn(W, bits, group, sym)
    c1, s1, z1 = jointq(W, H, c0, s0, z0, bits, group, lam=lam, max_rounds=2)
    Hr = regularised(H, lam)
    f0 = objective(W, dense(c0, s0, z0, group), Hr)
    f1 = objective(W, dense(c1, s1, z1, group), Hr)
    assert torch.all(f1 <= f0 * (1 + 1e-6) + 1e-9)                # per row, on its own objective
    assert int(c1.max()) < 2**bits and torch.equal(z1, z0)         # codes on the grid, zeros kept
    assert torch.equal(s1.half().float(), s1)                       # scales stay 16-bit


def test_jointq_improves_on_gptq():
    X = inputs(128, 512, 3)
    H = X @ X.T / 512
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(4))
    c0, s0, z0 = gptq(W, H, 3, 32, False)
    c1, s1, z1 = jointq(W, H, c0, s0, z0, 3, 32, max_rounds=5)
    f0 = objective(W, dense(c0, s0, z0, 32), H).sum()
    f1 = objective(W, dense(c1, s1, z1, 32), H).sum()
    assert f1 < 0.99 * f0


def test_registered_by_name_and_runs_end_to_end(tiny_llama, tmp_path):
    import onecomp_core
    from onecomp_core.sdk import load_plugins
    from onecomp_plugin_jointq.plugin import JointQ
    reg = load_plugins().registry
    assert reg.get("projector", "jointq") is JointQ and reg.source("projector", "jointq") == "jointq"
    gp = onecomp_core.quantize(tiny_llama, tmp_path / "g", bits=3, group_size=32, projector="gptq",
                               num_samples=4, seq_len=32)
    jq = onecomp_core.quantize(tiny_llama, tmp_path / "j", bits=3, group_size=32, projector="jointq",
                               num_samples=4, seq_len=32)
    # same statistics for the first group of block 0, so JointQ ends no worse than its GPTQ start there
    for n in ("q_proj", "k_proj", "v_proj"):
        name = f"model.layers.0.self_attn.{n}"
        assert jq["layers"][name]["rel_error"] <= gp["layers"][name]["rel_error"] + 1e-9, n
