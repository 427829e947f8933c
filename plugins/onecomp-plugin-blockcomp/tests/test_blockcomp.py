import pytest
import torch

import onecomp_core
from onecomp_core.sdk import load_plugins
from onecomp_core.testing import ARCHS, installed
from onecomp_plugin_blockcomp import compensate
from onecomp_plugin_blockcomp.plugin import BlockCompensation


def test_registered_at_block_scope():
    reg = load_plugins().registry
    assert reg.get("refiner", "blockcomp") is BlockCompensation
    assert BlockCompensation.scopes() == ("block",)


def test_block_compensation_never_worse_on_held_samples(tiny_llama):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    block = model.model.layers[0]
    torch.manual_seed(0)
    h = torch.randn(4, 16, 64)
    pos = torch.arange(16)[None]
    kw = {"position_embeddings": model.model.rotary_emb(h, pos), "attention_mask": None}
    with torch.no_grad():
        target = block(h, **kw)
        block.self_attn.q_proj.weight.add_(0.05 * torch.randn_like(block.self_attn.q_proj.weight))  # "quantized"
    params = [block.mlp.gate_proj.weight, block.mlp.up_proj.weight, block.mlp.down_proj.weight]
    r = compensate(block, params, h, target, kw, steps=10, lr=1e-2, batch=2, eval_samples=4, seed=0)
    assert r["after"] <= r["before"]
    assert r["kept"] == (r["after"] < r["before"])


def test_blockcomp_changes_the_later_groups(tiny_llama, tmp_path):
    from safetensors.torch import load_file
    kw = dict(bits=3, group_size=32, projector="rtn", num_samples=4, seq_len=32)
    onecomp_core.quantize(tiny_llama, tmp_path / "a", **kw)
    rep = onecomp_core.quantize(tiny_llama, tmp_path / "b", refiners=["blockcomp"],
                                options={"blockcomp": {"steps": 8, "lr": 1e-2}}, **kw)
    assert len(rep["layers"]) == 14
    a, b = (load_file(str(tmp_path / d / "model-block-00000.safetensors")) for d in ("a", "b"))
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith("weight_packed"))


@pytest.mark.parametrize("arch", ARCHS)
def test_blockcomp_on_every_architecture(arch, tiny_models, tmp_path):
    """Block-wise compensation on each adapter's blocks: every linear quantized once with a
    finite, bounded error, and the checkpoint loads and runs."""
    projector = "jointq" if installed("projector", "jointq") else "rtn"       # with JointQ where it is there
    rep = onecomp_core.quantize(tiny_models(arch), tmp_path / "q", bits=3, group_size=32, projector=projector,
                                refiners=["blockcomp"], options={"blockcomp": {"steps": 2}},
                                num_samples=2, seq_len=32)
    errs = [li["rel_error"] for li in rep["layers"].values()]
    assert errs and all(0 <= e < 2 for e in errs)
    model = onecomp_core.load_quantized(tmp_path / "q")
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(3, 300, (1, 8))).logits).all()
