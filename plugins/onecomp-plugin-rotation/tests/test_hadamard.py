"""The hadamard preprocessor: orthogonal rotations of any order, exactly function-preserving on
every architecture it accepts (one-line refusal on the others), and a pipeline run whose
checkpoint is an ordinary one of the same architecture."""
import json
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers import AutoModelForCausalLM

import onecomp_core
from onecomp_core.sdk import OnecompError, find_adapter, load_plugins
from onecomp_core.testing import ARCHS, as_pipeline_sees_it, spying
from onecomp_plugin_rotation.fuse import fold_norm, rotate_heads_columns, rotate_heads_rows
from onecomp_plugin_rotation.hadamard import hadamard, largest_order, paley, recipe, rotation
from onecomp_plugin_rotation.plugin import Hadamard, HadamardOptions

ROTATABLE = [a for a in ARCHS if not a.startswith("gemma")]


def test_found_by_name_through_entry_point():
    reg = load_plugins().registry
    assert reg.get("preprocessor", "hadamard") is Hadamard and reg.source("preprocessor", "hadamard") == "rotation"


@pytest.mark.parametrize("q", [3, 7, 11, 19, 23, 31, 43])
def test_paley_matrices_are_hadamard(q):
    H = paley(q)
    assert set(H.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(H @ H.T, (q + 1) * torch.eye(q + 1, dtype=torch.float64))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 700), st.integers(0, 2**31 - 1))
def test_rotation_of_any_order_is_orthogonal_and_seeded(n, seed):
    R = rotation(n, seed)
    assert R.shape == (n, n) and R.dtype == torch.float64
    assert torch.allclose(R @ R.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(R, rotation(n, seed))
    d = largest_order(n)
    assert n % d == 0 and recipe(d) is not None
    H = hadamard(d)
    assert torch.equal(H @ H.T, d * torch.eye(d, dtype=torch.float64))
    if n % 4 == 0 and n <= 200 and n not in (92, 116, 156, 172, 184, 188):     # orders 4k reached directly here
        assert recipe(n) is not None or n in (28, 36, 52, 56, 68, 76, 100, 108, 112, 124, 136, 148, 152, 164, 196)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([0.0, 1.0]))
def test_fused_rotation_preserves_a_norm_reader_writer_chain(seed, offset):
    g = torch.Generator().manual_seed(seed)
    d, h, heads = 12, 4, 3
    x = torch.randn(5, d, generator=g, dtype=torch.float64)
    w = torch.rand(d, generator=g, dtype=torch.float64) + 0.5
    Wr = torch.randn(heads * h, d, generator=g, dtype=torch.float64)        # reader (a value projection)
    Wo = torch.randn(d, heads * h, generator=g, dtype=torch.float64)        # writer (output projection)
    xhat = lambda v: v / v.pow(2).mean(-1, keepdim=True).sqrt()
    before = x + (xhat(x) * (offset + w)) @ Wr.T @ Wo.T
    R1, R2 = rotation(d, seed), rotation(h, seed + 1)
    fold_norm(w, offset, [Wr], R1)
    rotate_heads_rows(Wr, 0, heads, R2)
    rotate_heads_columns(Wo, R2)
    Wo.copy_(R1.T @ Wo)
    xr = x @ R1                                                              # the rotated stream
    after = xr + (xhat(xr) * (offset + w)) @ Wr.T @ Wo.T
    assert torch.allclose(after @ R1.T, before, atol=1e-10)


def _transform(model, seed=0, r2=True):
    adapter = find_adapter(model.config, load_plugins().registry)
    layers = model.get_submodule(adapter.blocks_path())
    ctx = SimpleNamespace(model_config=model.config, adapter=adapter, block=lambda i: layers[i], release=lambda i: None)
    t = Hadamard(HadamardOptions(seed=seed, r2=r2)).fit(ctx)
    for i, block in enumerate(layers):
        t.apply_block(i, block)
    head = model.get_output_embeddings()
    t.apply_final(model.get_submodule(adapter.final_norm_path()), head)
    t.apply_outer(model.get_input_embeddings(), head)
    return t


@pytest.mark.parametrize("arch", ROTATABLE)
def test_fp_logits_unchanged_on_every_rotatable_architecture(arch, tiny_models):
    folder = tiny_models(arch)
    ref = AutoModelForCausalLM.from_pretrained(folder).eval()
    model = as_pipeline_sees_it(AutoModelForCausalLM.from_pretrained(folder).eval())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    t = _transform(model)
    changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p)]
    assert any("v_proj" in n or "qkv_proj" in n for n in changed) and any("down_proj" in n for n in changed)
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(ids).logits, model(ids).logits
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-5, arch
    norms = [p for n, p in model.named_parameters() if n.endswith("layernorm.weight") or n == "model.norm.weight"]
    assert norms and all(torch.equal(p, torch.ones_like(p)) for p in norms)       # every gain folded away
    assert t.describe()["hidden"] == model.config.hidden_size


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_post_norm_architectures_are_refused_in_one_line(arch, tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models(arch)).eval()
    with pytest.raises(OnecompError, match=r"hadamard cannot rotate gemma.* exactly.*post-norms") as e:
        _transform(model)
    assert "\n" not in str(e.value)


def test_online_down_is_refused_until_a_loader_applies_it(tiny_llama):
    with pytest.raises(OnecompError, match="online_down=true needs a format and loader"):
        Hadamard(HadamardOptions(online_down=True)).fit(SimpleNamespace(model_config=None))


def test_pipeline_writes_an_ordinary_checkpoint_that_computes_the_same_function(tiny_llama, tmp_path):
    out = tmp_path / "q"
    rep = onecomp_core.quantize(tiny_llama, out, preprocessors=["hadamard"], bits=8, group_size=32, projector="rtn",
                                num_samples=2, seq_len=32, store_dtype="float32")
    assert rep["preprocessors"][0]["name"] == "hadamard"
    src = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == src.config.model_type
    assert config.get("tie_word_embeddings", False) == (src.config.tie_word_embeddings and not rep["preprocessors"][0]["untied_head"])
    ids = torch.randint(3, 300, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = src(ids).logits
        out_q = onecomp_core.load_quantized(out, "cpu")(ids).logits
    assert ((out_q - ref).abs().max() / ref.abs().max()).item() < 0.05          # 8 bits of the rotated weights


@pytest.mark.whole_suite                 # pipeline runs: in the whole suite, not the isolated check
@pytest.mark.parametrize("gain", [None, "random"])
def test_a_tied_head_is_untied_only_when_the_final_norm_needs_folding(gain, tmp_path):
    from transformers import LlamaConfig
    from onecomp_core.testing import COMMON, tokenizer
    torch.manual_seed(0)
    src = AutoModelForCausalLM.from_config(LlamaConfig(**COMMON, tie_word_embeddings=True))
    if gain:
        with torch.no_grad():
            src.model.norm.weight.copy_(torch.rand(COMMON["hidden_size"]) + 0.5)
    src.save_pretrained(tmp_path / "m")
    tokenizer(tmp_path / "m")
    out = tmp_path / "q"
    rep = onecomp_core.quantize(tmp_path / "m", out, preprocessors=["hadamard"], bits=8, group_size=32,
                                projector="rtn", num_samples=2, seq_len=32, store_dtype="float32")
    untied = rep["preprocessors"][0]["untied_head"]
    assert untied == bool(gain)
    assert json.loads((out / "config.json").read_text()).get("tie_word_embeddings", True) == (not gain)
    ids = torch.randint(3, 300, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = src.eval()(ids).logits
        got = onecomp_core.load_quantized(out, "cpu")(ids).logits
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 0.05


def test_refusal_happens_before_any_work_and_writes_nothing(tiny_models, tmp_path, capsys):
    from onecomp_core.testing import cli
    model = tiny_models("gemma2")
    capsys.readouterr()
    rc = cli(["quantize", str(model), "--out", str(tmp_path / "q"), "--preprocessor", "hadamard",
              "--projector", "rtn", "--group-size", "32", "--num-samples", "2", "--seq-len", "32"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "hadamard cannot rotate gemma2 exactly" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "q").exists() and not any(tmp_path.glob("q*"))


def test_symmetric_checkpoint_loads_in_plain_transformers_with_onecomps_logits(tiny_llama, tmp_path):
    out = tmp_path / "q"
    onecomp_core.quantize(tiny_llama, out, preprocessors=["hadamard"], bits=4, group_size=32, symmetric=True,
                          projector="rtn", num_samples=2, seq_len=32)
    plain = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ours = onecomp_core.load_quantized(out, "cpu")
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = ours(ids).logits.float(), plain(ids).logits.float()
    assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())


def test_cayley_step_keeps_rotations_orthogonal():
    from onecomp_plugin_rotation.spinquant import cayley_step
    g = torch.Generator().manual_seed(0)
    R = rotation(12, 0)
    for _ in range(5):
        R = cayley_step(R, torch.randn(12, 12, generator=g, dtype=torch.float64), 0.5)
    assert torch.allclose(R @ R.T, torch.eye(12, dtype=torch.float64), atol=1e-10)


@pytest.mark.whole_suite                 # pipeline runs: in the whole suite, not the isolated check
@pytest.mark.parametrize("arch, loss", [("llama", "kl"), ("qwen2", "ce")])
def test_spinquant_learns_rotations_that_keep_the_function_and_lower_its_loss(arch, loss, tiny_models, tmp_path):
    from onecomp_plugin_rotation.plugin import SpinQuant
    plugin, seen = spying(SpinQuant, "spyspin")
    folder = tiny_models(arch)
    rep = onecomp_core.quantize(folder, tmp_path / "q", plugins=[plugin], preprocessors=["spyspin"],
                                options={"spyspin": {"steps": 4, "samples": 2, "lr": 0.5, "loss": loss}},
                                bits=3, group_size=32, projector="rtn", num_samples=3, seq_len=32)
    d = rep["preprocessors"][0]
    assert d["steps"] == 4 and d["loss"] == loss and d["heldout_samples"] == 1     # learns on 2, judged on the 3rd
    assert d["loss_end"] >= 0 and (d["kept_learned"] == (d["loss_end"] < d["loss_start"]))
    t = seen[0]
    eye = torch.eye(t.R1.shape[0], dtype=torch.float64)
    assert torch.allclose(t.R1 @ t.R1.T, eye, atol=1e-6)
    ref = AutoModelForCausalLM.from_pretrained(folder).eval()
    model = as_pipeline_sees_it(AutoModelForCausalLM.from_pretrained(folder).eval())
    layers = model.get_submodule("model.layers")
    for i, block in enumerate(layers):
        t.apply_block(i, block)
    head = model.get_output_embeddings()
    t.apply_final(model.model.norm, head)
    t.apply_outer(model.get_input_embeddings(), head)
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(ids).logits, model(ids).logits
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-5


def test_token_kl_is_zero_on_the_teacher_itself_and_positive_elsewhere():
    from onecomp_plugin_rotation.spinquant import token_kl
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 11, generator=g)
    logp = torch.log_softmax(z, -1)
    assert token_kl(z + 3.0, logp).abs().item() < 1e-6                 # same distribution (logits shifted)
    other = torch.randn(5, 11, generator=g)
    direct = (logp.exp() * (logp - torch.log_softmax(other, -1))).sum(-1).mean()
    assert torch.isclose(token_kl(other, logp), direct) and direct > 0


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), bits=st.sampled_from([2, 3, 4]), group=st.sampled_from([-1, 16]),
       symmetric=st.booleans())
def test_fake_quant_with_the_clipping_search_is_never_worse_on_its_own_error(seed, bits, group, symmetric):
    from onecomp_plugin_rotation.spinquant import fake_quant
    W = torch.randn(6, 32, generator=torch.Generator().manual_seed(seed)) * torch.rand(6, 1) ** 3
    W[0, 0] = 8.0                                                   # an outlier the search may clip
    W.requires_grad_(True)

    def err(Q):
        e = (Q - W).detach().abs().pow(2.4)
        return e.view(6, -1, 32 if group == -1 else group).sum(-1)        # each group's |e|^2.4
    plain, clipped = fake_quant(W, bits, group, symmetric), fake_quant(W, bits, group, symmetric, clip_steps=20)
    assert (err(clipped) <= err(plain) * (1 + 1e-5) + 1e-6).all()
    clipped.sum().backward()                                        # straight-through: dQ/dW = I
    assert torch.equal(W.grad, torch.ones_like(W))


def test_spinquant_refuses_a_memory_budget_it_cannot_fit():
    from transformers import LlamaConfig
    from onecomp_core.testing import COMMON
    from onecomp_plugin_rotation.plugin import SpinQuant, SpinQuantOptions, _learn_bytes
    cfg = LlamaConfig(**COMMON)
    from onecomp_core.sdk import rss_bytes
    need = _learn_bytes(cfg, 32, 2) + rss_bytes()              # the default KL loss caches the FP log-probs
    ctx = SimpleNamespace(model_config=cfg, run=None, adapter=None, inputs=lambda: (torch.zeros(2, 32, 64), [{}, {}]),
                          calibration_ids=torch.zeros(2, 32, dtype=torch.long), max_memory=need - 2**20)
    with pytest.raises(OnecompError, match=r"spinquant needs ~[\d.]+ [GM]iB to learn its rotations .* max-memory"):
        SpinQuant(SpinQuantOptions()).fit(ctx)
    smol = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=49152)
    assert 1e9 < _learn_bytes(smol, 512, 12) < 5e9                  # SmolLM2, 8 + 4 samples cached: fits 8 GB
