"""The uniform format's output folder is a compressed-tensors checkpoint that transformers loads."""
import pytest
import torch
from transformers import AutoModelForCausalLM

import onecomp_core
from onecomp_core.testing import quick


@pytest.mark.parametrize("bits,group", [(4, 32), (3, 48), (8, -1), (2, 64)])
def test_transformers_loads_the_same_logits(tiny_llama, tmp_path, bits, group):
    out = tmp_path / "q"
    onecomp_core.quantize(tiny_llama, out, **quick(bits=bits, group_size=group, symmetric=True, projector="gptq"))
    ours = onecomp_core.load_quantized(out)
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    assert getattr(theirs.config, "quantization_config", None) is not None
    ids = torch.randint(3, 384, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())


def test_config_groups_describe_each_module(tiny_llama, tmp_path):
    import json
    out = tmp_path / "q"
    onecomp_core.quantize(tiny_llama, out, **quick(bits=4, group_size=48, symmetric=True))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    sizes = {g["weights"]["group_size"] for g in qc["config_groups"].values()}
    assert sizes == {16, 48}       # in=64: gcd(64, 48) = 16 on disk; in=96: 48 divides it
    meta = json.loads((out / "onecomp.json").read_text())
    assert {m["group_size"] for m in meta["modules"].values()} == {48}
