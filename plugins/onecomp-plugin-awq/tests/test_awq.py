"""The awq preprocessor: the searched scales never raise the group's objective above no scaling,
and the fitted transform keeps the FP model's function on every supported architecture."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers import AutoModelForCausalLM

import onecomp_core
from onecomp_core.sdk import load_plugins
from onecomp_core.testing import ARCHS, as_pipeline_sees_it, spying
from onecomp_plugin_awq.plugin import AWQ
from onecomp_plugin_awq.search import group_error, scales_for, search


def test_found_by_name_through_entry_point():
    reg = load_plugins().registry
    assert reg.get("preprocessor", "awq") is AWQ and reg.source("preprocessor", "awq") == "awq"


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([(3, 32, False), (4, -1, True), (2, 16, False)]))
def test_search_never_worse_than_no_scaling(seed, grid_):
    bits, group, sym = grid_
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(256, 32, generator=g) * (torch.rand(32, generator=g) * 10 + 0.1)       # outlier channels
    H = X.T @ X / X.shape[0]
    Ws = [torch.randn(24, 32, generator=g) for _ in range(2)]
    s, alpha, err, none = search(Ws, H, X.abs().mean(0), bits, group, sym, steps=10)
    assert torch.equal(scales_for(X.abs().mean(0), 0.0), torch.ones(32, dtype=torch.float64))
    assert none == pytest.approx(group_error(Ws, H, torch.ones(32, dtype=torch.float64), bits, group, sym))
    assert err <= none and err == pytest.approx(group_error(Ws, H, s, bits, group, sym))
    assert 0.0 <= alpha < 1.0


@pytest.mark.whole_suite                 # eight pipeline runs: in the whole suite, not the isolated check
@pytest.mark.parametrize("arch", ARCHS)
def test_fitted_scales_keep_the_fp_function_on_every_architecture(arch, tiny_models, tmp_path):
    plugin, seen = spying(AWQ, "spyawq")
    folder = tiny_models(arch)
    rep = onecomp_core.quantize(folder, tmp_path / "q", plugins=[plugin], preprocessors=["spyawq"],
                                bits=3, group_size=32, projector="rtn", num_samples=2, seq_len=32)
    t = seen[0]
    assert rep["preprocessors"][0]["groups"] == len(t.report) >= 2 * 2
    assert all(r["error"] <= r["error_none"] for r in t.report)
    assert any(r["alpha"] > 0 for r in t.report)                       # it did scale something
    ref = AutoModelForCausalLM.from_pretrained(folder).eval()
    model = as_pipeline_sees_it(AutoModelForCausalLM.from_pretrained(folder).eval())
    layers = model.model.layers
    for i, block in enumerate(layers):
        t.apply_block(i, block)
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(ids).logits, model(ids).logits
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-5, arch


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([(3, 32, False), (4, -1, True)]))
def test_projected_error_under_round_to_nearest_is_the_search_objective(seed, grid_):
    """With round to nearest as the projector, the check measures exactly what the search did
    (the scaled coordinates W diag(s), H_s give back the unscaled output error)."""
    from onecomp_core.sdk import grid
    from onecomp_plugin_awq.search import projected_error
    bits, group, sym = grid_
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(256, 32, generator=g, dtype=torch.float64) * (torch.rand(32, generator=g, dtype=torch.float64) * 10 + 0.1)
    H = X.T @ X / X.shape[0]
    Ws = {f"m{k}": torch.randn(24, 32, generator=g) for k in range(2)}

    def rtn(name, W, Hs):
        q, sc, z = grid.rtn(W, bits, group, sym)
        return grid.dequantize(q.float(), grid.expand(sc, 32, group), grid.expand(z, 32, group))

    s = scales_for(X.abs().mean(0), 0.5)
    expected = group_error(list(Ws.values()), H, s, bits, group, sym)
    assert projected_error(Ws, H, s, rtn) == pytest.approx(expected, rel=1e-4)
    assert projected_error(Ws, H, s, lambda *a: None) == 0.0           # modules left in full precision count nothing


@pytest.mark.whole_suite                 # GPTQ is another distribution: not there in the isolated check
def test_scales_the_run_projector_does_worse_with_are_reverted(tiny_llama, tmp_path):
    """verify (default): each searched scale is measured against none under the run's projector
    (GPTQ here); the kept one is never worse there, and a reverted group is left unscaled."""
    plugin, seen = spying(AWQ, "spyawq")
    rep = onecomp_core.quantize(tiny_llama, tmp_path / "q", plugins=[plugin], preprocessors=["spyawq"],
                                bits=3, group_size=32, projector="gptq", num_samples=2, seq_len=32)
    t = seen[0]
    checked = [r for r in t.report if "projector_error" in r]
    assert checked and rep["preprocessors"][0]["verified"] == len(checked)
    assert rep["preprocessors"][0]["reverted"] == sum(r["reverted"] for r in checked)
    for r in checked:
        assert r["reverted"] == (r["projector_error"] >= r["projector_error_none"])
        if r["reverted"]:
            assert r["alpha"] == 0.0
    plugin2, seen2 = spying(AWQ, "spyawq2")
    onecomp_core.quantize(tiny_llama, tmp_path / "q2", plugins=[plugin2], preprocessors=["spyawq2"],
                          bits=3, group_size=32, projector="gptq", num_samples=2, seq_len=32,
                          options={"spyawq2": {"verify": False}})
    assert not any("projector_error" in r for r in seen2[0].report)


def test_a_run_where_awq_keeps_no_scales_says_so_in_one_line(tiny_llama, tmp_path, capsys):
    """steps=1 leaves alpha = 0 alone in the grid: nothing is scaled, and the run says so."""
    from onecomp_plugin_awq.plugin import kept_none
    rep = onecomp_core.quantize(tiny_llama, tmp_path / "q", preprocessors=["awq"], bits=3, group_size=32,
                                projector="rtn", num_samples=2, seq_len=32, options={"awq": {"steps": 1}})
    groups = rep["preprocessors"][0]["groups"]
    assert groups > 0 and rep["preprocessors"][0]["mean_alpha"] == 0
    line = (f"onecomp: note: awq kept no scales ({groups} groups: {groups} chose alpha 0, 0 did worse under the "
            f"run's projector): the model is quantized as it is; drop --preprocessor awq to save its time")
    assert line in capsys.readouterr().err.splitlines()
    assert "2 chose alpha 0, 1 did worse" in kept_none([{"alpha": 0.0}, {"alpha": 0.0},
                                                        {"alpha": 0.0, "reverted": True}])
    capsys.readouterr()
    onecomp_core.quantize(tiny_llama, tmp_path / "q2", preprocessors=["awq"], bits=3, group_size=32,
                          projector="rtn", num_samples=2, seq_len=32)        # the default grid scales some groups
    assert "awq kept no scales" not in capsys.readouterr().err
