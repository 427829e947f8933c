"""report.html (plots embedded, tables) and the model card README.md in every output folder."""
import base64
import json
import re
import subprocess
import sys

import pytest

import onecomp_core
from onecomp_core.report_html import by_block, module_kind
from onecomp_core.testing import quick


def test_module_kind_names_block_and_type():
    assert module_kind("model.layers.3.self_attn.q_proj") == (3, "self_attn.q_proj")
    assert module_kind("model.layers.12.mlp.experts.7.up_proj") == (12, "mlp.experts.*.up_proj")
    assert module_kind("lm_head") == (None, "lm_head")
    layers = {"m.layers.0.a": {"bpw": 4.0}, "m.layers.0.b": {"bpw": 2.0}, "m.layers.1.a": {"bpw": 3.0}}
    blocks, kinds, v = by_block(layers, "bpw")
    assert blocks == [0, 1] and kinds == ["a", "b"] and v == {(0, "a"): 4.0, (0, "b"): 2.0, (1, "a"): 3.0}


def test_output_folder_has_html_report_and_model_card(tiny_llama, tmp_path):
    out = tmp_path / "q"
    text = tmp_path / "eval.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    rep = onecomp_core.quantize(tiny_llama, out, eval_text=str(text), **quick(bits=4, group_size=32))
    page = (out / "report.html").read_text()
    pngs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(pngs) == 3                                          # error by block, allocation, bpw by type
    assert all(base64.b64decode(p)[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    for title in ("Relative output error by block", "Bit allocation", "Bits per weight by module type", "Evaluation"):
        assert title in page
    assert page.count("<tr>") >= len(rep["layers"])               # every module in the table
    card = (out / "README.md").read_text()
    s, ev = rep["summary"], rep["evaluation"]
    assert f"uniform 4-bit integers, group 32, {'symmetric' if s['symmetric'] else 'asymmetric'}" in card
    assert f"perplexity: {ev['ppl']:.3f} (full precision: {ev['ppl_ref']:.3f})" in card
    assert f"checkpoint size: {s['checkpoint_mb']} MB" in card
    assert "AutoModelForCausalLM.from_pretrained" in card and "vllm serve" in card
    assert "re-run with `--export gguf`" in card
    assert json.loads((out / "report.json").read_text())["summary"]["bpw"] == s["bpw"]


def test_model_card_of_a_format_without_compressed_tensors_scheme(tiny_llama, tmp_path):
    from onecomp_core.model_card import model_card
    out = tmp_path / "x"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model_type": "llama"}))
    card = model_card({"summary": {"model": "m", "format": "dbf", "projector": "dbf", "bpw": 1.5}}, out)
    assert "plain transformers and vLLM cannot load it" in card and "vllm serve" not in card
    assert "not evaluated in this run" in card


def test_each_stage_reports_its_own_peak(tiny_llama, tmp_path):
    """A stage's own peak is at most the process's peak and at least what it held at its start and end;
    the summary's peak is the largest of them (the high-water mark reset per stage is kept aside)."""
    import sys
    out = tmp_path / "q"
    onecomp_core.quantize(tiny_llama, out, **quick(bits=4, group_size=32))
    rep = json.loads((out / "report.json").read_text())
    mem = rep["stage_memory"]
    if not sys.platform.startswith("linux"):
        pytest.skip("per-stage peaks need Linux's /proc/self/clear_refs")
    for name, m in mem.items():
        assert m["rss_mb"] <= m["stage_peak_rss_mb"] + 1 and m["stage_peak_rss_mb"] <= m["peak_rss_mb"] + 1e-6, name
        assert 0 < m["start_rss_mb"] <= m["stage_peak_rss_mb"] + 1, name
    assert rep["summary"]["peak_rss_mb"] >= max(m["stage_peak_rss_mb"] for m in mem.values())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fork/exec carry-over is Linux's")
def test_peak_memory_is_the_process_own_not_its_parents():
    """A run started by a large process (a bench script holding a model) reports its own peak:
    getrusage's ru_maxrss would report the parent's resident size at the fork."""
    held = bytearray(800 * 2**20)
    for i in range(0, len(held), 4096):
        held[i] = 1
    code = ("import resource; from onecomp_core.report import peak_rss_mb; "
            "print(peak_rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    own, maxrss = map(float, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                            check=True).stdout.split())
    assert maxrss >= 800 and own < maxrss - 500
    del held
