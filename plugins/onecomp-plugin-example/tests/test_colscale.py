"""The template preprocessor: function-preserving on every supported architecture, applied
block by block as the pipeline loads each block, and recorded in the run report."""
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers import AutoModelForCausalLM

import onecomp_core
from onecomp_core.sdk import find_adapter, load_plugins
from onecomp_core.testing import ARCHS
from onecomp_plugin_example.colscale import column_scales, fold
from onecomp_plugin_example.plugin import ColScale, ColScaleOptions


def test_found_by_name_through_entry_point():
    reg = load_plugins().registry
    assert reg.get("preprocessor", "colscale") is ColScale and reg.source("preprocessor", "colscale") == "example"


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.0, 1.0), st.sampled_from([0.0, 1.0]))
def test_fold_preserves_the_map(seed, alpha, offset):
    g = torch.Generator().manual_seed(seed)
    x_hat = torch.randn(5, 16, generator=g, dtype=torch.float64)
    w = torch.rand(16, generator=g, dtype=torch.float64) + 0.5
    Ws = [torch.randn(4, 16, generator=g, dtype=torch.float64) * (torch.rand(1, 16, generator=g) * 4 + 0.1)
          for _ in range(2)]
    before = [x_hat * (offset + w) @ W.T for W in Ws]
    s = column_scales(Ws, alpha)
    assert torch.exp(torch.log(s).mean()).item() == pytest.approx(1.0)
    fold(w, offset, Ws, s)
    for b, W in zip(before, Ws):
        assert torch.allclose(x_hat * (offset + w) @ W.T, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arch", ARCHS)
def test_fp_logits_unchanged_on_every_architecture(arch, tiny_models):
    folder = tiny_models(arch)
    ref = AutoModelForCausalLM.from_pretrained(folder).eval()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    adapter = find_adapter(model.config, load_plugins().registry)
    t = ColScale(ColScaleOptions(alpha=1.0)).fit(SimpleNamespace(adapter=adapter))
    layers = model.get_submodule(adapter.blocks_path())
    for i, block in enumerate(layers):
        before = {n: p.detach().clone() for n, p in block.named_parameters()}
        t.apply_block(i, block)
        assert any(not torch.equal(before[n], p) for n, p in block.named_parameters())   # it did something
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(ids).logits, model(ids).logits
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-5, arch


def test_runs_block_by_block_in_the_pipeline_and_is_reported(tiny_llama, tmp_path):
    """The transform sees each block once, as the layer-wise pass loads it (the uniform planner
    loads none), and the run report and onecomp.json record it."""
    seen = []

    class Spy(ColScale):
        def fit(self, ctx):
            t = super().fit(ctx)
            seen.append(t)
            return t
    from onecomp_core.sdk import hookimpl

    class Plugin:
        @hookimpl
        def onecomp_register_preprocessors(self, registry):
            registry.add_preprocessor(type("SpyScale", (Spy,), {"name": "spyscale"}))
    rep = onecomp_core.quantize(tiny_llama, tmp_path / "q", plugins=[Plugin()], preprocessors=["spyscale"],
                                bits=8, group_size=32, projector="rtn", num_samples=2, seq_len=32)
    assert seen[0].blocks == [0, 1]                              # one block at a time, in order
    assert rep["preprocessors"] == [{"name": "spyscale", **seen[0].describe()}]
    meta = __import__("json").loads((tmp_path / "q" / "onecomp.json").read_text())
    assert meta["transforms"][0]["name"] == "spyscale"
    # the checkpoint holds the transformed norm (the quantized model is still the same function)
    from safetensors.torch import load_file
    blk = load_file(str(tmp_path / "q" / "model-block-00000.safetensors"))
    src = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert not torch.equal(blk["model.layers.0.input_layernorm.weight"], src.model.layers[0].input_layernorm.weight)
    plain = onecomp_core.quantize(tiny_llama, tmp_path / "p", bits=8, group_size=32, projector="rtn",
                                  num_samples=2, seq_len=32)
    ids = torch.randint(3, 300, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = src(ids).logits
        for d in ("q", "p"):
            out = onecomp_core.load_quantized(tmp_path / d, "cpu")(ids).logits
            assert ((out - ref).abs().max() / ref.abs().max()).item() < 0.05, d     # 8 bits: close to FP either way
