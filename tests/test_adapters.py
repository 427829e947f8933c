import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

import onecomp_core
from onecomp_core.errors import OnecompError
from onecomp_core.testing import ARCHS
from onecomp_core.testing import quick


def simulated(fp_folder, q_folder):
    """The FP model with each quantized linear's weight replaced by its dequantized weight."""
    from onecomp_core.checkpoint import load_quantized
    qmodel = load_quantized(q_folder)
    model = AutoModelForCausalLM.from_pretrained(fp_folder, dtype=torch.float32).eval()
    return model, qmodel


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_quantizes_and_loads(arch, tiny_models, tmp_path):
    folder = tiny_models(arch)
    rep = onecomp_core.quantize(folder, tmp_path / "q", **quick(projector="gptq"))
    meta = json.loads((tmp_path / "q" / "onecomp.json").read_text())
    names = list(meta["modules"])
    assert names, "nothing quantized"
    if arch == "phi3":
        assert any(n.endswith("qkv_proj") for n in names) and any(n.endswith("gate_up_proj") for n in names)
    if arch == "mixtral":
        assert any(".experts.3.down_proj" in n for n in names)
        assert not any(n.endswith("mlp.gate") for n in names)          # the router stays in full precision
    assert all(0 <= li["rel_error"] < 1 for li in rep["layers"].values())
    qmodel = onecomp_core.load_quantized(tmp_path / "q")
    fp = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(3, 384, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lq, lf = qmodel(ids).logits, fp(ids).logits
    assert torch.isfinite(lq).all()
    assert lq.shape == lf.shape
    rel = float((lq - lf).norm() / lf.norm())
    assert 0 < rel < 0.5, rel


def test_loaded_model_equals_the_dequantized_weights(tiny_llama, tmp_path):
    """What the scheduler simulated in the quantized stream is what the checkpoint holds (the
    unquantized tensors kept in float32 here, as the FP model they are compared with)."""
    onecomp_core.quantize(tiny_llama, tmp_path / "q", **quick(projector="gptq", bits=3, group_size=48,
                                                              store_dtype="float32"))
    qmodel = onecomp_core.load_quantized(tmp_path / "q")
    fp = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, mod in qmodel.named_modules():
            if getattr(mod, "onecomp_quantized", False):
                fp.get_submodule(name).weight.copy_(mod.weight_dequantized())
        ids = torch.randint(3, 384, (2, 20))
        assert torch.allclose(qmodel(ids).logits, fp(ids).logits, atol=1e-5)


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    cfg = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(OnecompError, match=r"unsupported architecture 'gpt2'; supported model types: .*llama.*"
                                           r"ModelAdapter plugin"):
        onecomp_core.quantize(tmp_path / "gpt2", tmp_path / "q", **quick())
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("arch", ARCHS)
def test_norm_inputs_name_every_reader_of_each_norm(arch, tiny_models):
    """The norms before attention and MLP and the modules reading them, as function-preserving
    transforms fold into them; Gemma's (1 + w) norms have offset 1."""
    from onecomp_core.plugins import load_plugins
    from onecomp_core.skeleton import Skeleton, pick_device
    sk = Skeleton(tiny_models(arch), load_plugins().registry, pick_device("cpu"))
    block = sk.blocks[0]
    norms = sk.adapter.norm_inputs(block)
    mlp_norm = "pre_feedforward_layernorm" if arch.startswith("gemma") else "post_attention_layernorm"
    assert set(norms) == {"input_layernorm", mlp_norm}
    attn = {g for g in sk.adapter.linear_groups(block)[0]}
    assert set(norms["input_layernorm"]) == attn
    readers = set(norms[mlp_norm])
    if arch == "mixtral":
        assert "mlp.gate" in readers and "mlp.experts.3.up_proj" in readers and len(readers) == 1 + 2 * 4
    else:
        assert readers == set(sk.adapter.linear_groups(block)[2])
    for norm, rs in norms.items():
        assert all(block.get_submodule(r).weight.shape[1] == block.get_submodule(norm).weight.shape[0] for r in rs)
        assert sk.adapter.norm_offset(block, norm) == (1.0 if arch.startswith("gemma") else 0.0)


def test_lpcd_residual_taps_where_the_adapter_declares_them(tiny_models):
    from onecomp_core.plugins import load_plugins
    from onecomp_core.skeleton import Skeleton, pick_device
    reg = load_plugins().registry
    sk = Skeleton(tiny_models("llama"), reg, pick_device("cpu"))
    assert sk.adapter.residual_taps(sk.blocks[0]) == {"self_attn.o_proj": "input_layernorm",
                                                      "mlp.down_proj": "post_attention_layernorm"}
    gemma = Skeleton(tiny_models("gemma2"), reg, pick_device("cpu"))
    assert gemma.adapter.residual_taps(gemma.blocks[0]) == {}     # outputs are normed before the add
