"""The run as stages: their order, exporters (the main one and extras, checked against the
formats before any work), model refiners with keep-if-better, the core alone."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import onecomp_core
from onecomp_core.cli import main
from onecomp_core.errors import OnecompError
from onecomp_core.testing import installed
from onecomp_core.sdk import Exporter, ModelRefiner, UniformFormat, hookimpl
from onecomp_core.testing import quick


class Stages:
    def __init__(self):
        self.names = []

    @hookimpl
    def onecomp_stage_start(self, stage, info):
        self.names.append(stage)


def test_stages_run_in_order_and_skip_what_has_nothing_to_do(tiny_llama, tmp_path):
    rec = Stages()
    rep = onecomp_core.quantize(tiny_llama, tmp_path / "q", plugins=[rec], **quick())
    assert rec.names == ["open_model", "calibration", "capture", "plan", "layerwise", "export"]
    assert list(rep["stages"]) == rec.names
    rec2 = Stages()
    onecomp_core.quantize(tiny_llama, tmp_path / "p", plugins=[rec2], preprocessors=["colscale"],
                          eval_text=str(tmp_path / "q" / "report.md"), **quick())
    assert rec2.names == ["open_model", "calibration", "capture", "preprocess", "plan", "layerwise", "export", "evaluate"]


class NpzExporter(Exporter):
    """Writes every quantized module's dequantized weight beside the checkpoint; carries the
    uniform format only (by its own check)."""
    name = "npz-test"

    def check(self, spec, fmt):
        if not isinstance(fmt, UniformFormat):
            raise OnecompError(f"exporter {self.name!r} cannot carry format {fmt.name!r}")

    def export(self, ectx):
        import numpy as np
        out = {}
        for f in ectx.block_files:
            t = load_file(str(f))
            for name, meta in ectx.modules.items():
                keys = {k: v for k, v in t.items() if k.startswith(name + ".")}
                if keys:
                    qt = ectx.formats[meta["format"]].from_tensors(name, keys, meta)
                    out[name] = qt.dequantize().numpy()
        np.savez(ectx.folder / "weights.npz", **out)
        assert (ectx.folder / "config.json").is_file()         # the main exporter ran first
        return ["weights.npz"]


class ExporterPlugin:
    @hookimpl
    def onecomp_register_exporters(self, registry):
        registry.add_exporter(NpzExporter)


def test_an_extra_exporter_writes_beside_the_main_checkpoint(tiny_llama, tmp_path):
    import numpy as np
    rep = onecomp_core.quantize(tiny_llama, tmp_path / "q", plugins=[ExporterPlugin()], exports=["npz-test"], **quick())
    assert rep["exports"]["npz-test"] == ["weights.npz"] and "config.json" in rep["exports"]["compressed-tensors"]
    w = np.load(tmp_path / "q" / "weights.npz")
    model = onecomp_core.load_quantized(tmp_path / "q")
    q = model.model.layers[1].mlp.down_proj
    assert np.array_equal(w["model.layers.1.mlp.down_proj"], q.weight_dequantized().detach().numpy())


def test_an_impossible_format_and_exporter_pair_stops_before_quantization(tiny_llama, tmp_path):
    rec = Stages()
    with pytest.raises(OnecompError, match="exporter 'npz-test' cannot carry format 'dbf'"):
        onecomp_core.quantize(tiny_llama, tmp_path / "q", plugins=[ExporterPlugin(), rec], exports=["npz-test"],
                              format="dbf", projector="dbf", target_bpw=1.5, num_samples=2, seq_len=32)
    assert "layerwise" not in rec.names
    # the default check: an exporter a format does not list
    class Strict(Exporter):
        name = "strict-test"

    class P:
        @hookimpl
        def onecomp_register_exporters(self, registry):
            registry.add_exporter(Strict)
    with pytest.raises(OnecompError, match=r"exporter 'strict-test' cannot carry format 'uniform' .*exporters of "
                                           r"'uniform': compressed-tensors\. Drop --export strict-test"):
        onecomp_core.quantize(tiny_llama, tmp_path / "r", plugins=[P()], exports=["strict-test"], **quick())


def test_export_flag_and_unknown_exporter(tiny_llama, tmp_path, capsys):
    code = main(["quantize", str(tiny_llama), "--out", str(tmp_path / "q"), "--export", "gguf-nope",
                 "--projector", "rtn", "--num-samples", "2", "--seq-len", "32"])
    assert code == 2
    assert "unknown exporter 'gguf-nope'; known: compressed-tensors" in capsys.readouterr().err


class Ruin(ModelRefiner):
    """Multiplies every scale of one module by 3: the held-out KL gets worse."""
    name = "ruin"

    def refine(self, mctx):
        model = mctx.load()
        mod = model.model.layers[1].mlp.down_proj
        qt = mod.to_tensor()
        qt.scale = qt.scale * 3
        return {"model.layers.1.mlp.down_proj": qt}


class Repair(ModelRefiner):
    """Puts back the scales of the module the pivot got wrong (the pivot below was built with
    a correction that halves them): the held-out KL improves."""
    name = "repair"

    def refine(self, mctx):
        assert mctx.heldout_ids.shape[0] == 1 and mctx.calibration_ids.shape[0] == 8     # auto: 4 x 2; held out 1
        model = mctx.load()
        out = {}
        for name in ("model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"):
            qt = model.get_submodule(name).to_tensor()
            qt.scale = qt.scale * 2
            out[name] = qt
        return out


class Wrong(ModelRefiner):
    name = "wrongbits"

    def refine(self, mctx):
        qt = mctx.load().model.layers[0].mlp.up_proj.to_tensor()
        qt.bits = 8
        return {"model.layers.0.mlp.up_proj": qt}


class Halve:
    """A correction that halves the scales of every o_proj (a broken pivot to repair)."""
    from onecomp_core.sdk import Correction as _C

    class H(_C):
        name = "halve"
        statistics = frozenset()

        def after_projection(self, ctx, qt):
            if ctx.name.endswith("o_proj"):
                qt.scale = (qt.scale / 2)
            return qt


class RefinerPlugin:
    @hookimpl
    def onecomp_register_refiners(self, registry):
        for c in (Ruin, Repair, Wrong, Halve.H):
            registry.add_refiner(c)


def test_model_refiners_are_kept_only_when_the_heldout_metric_does_not_get_worse(tiny_llama, tmp_path):
    kw = dict(plugins=[RefinerPlugin()], bits=4, group_size=32, projector="rtn", num_samples=2, seq_len=32)
    plain = onecomp_core.quantize(tiny_llama, tmp_path / "plain", refiners=["halve"], **kw)
    rec = Stages()
    rep = onecomp_core.quantize(tiny_llama, tmp_path / "q", refiners=["halve", "ruin", "repair"],
                                **{**kw, "plugins": kw["plugins"] + [rec]})
    assert rec.names.index("refine") == rec.names.index("export") + 1 > rec.names.index("layerwise") + 1
    ruin, repair = rep["refine"]
    assert ruin["name"] == "ruin" and not ruin["kept"] and ruin["after"] > ruin["before"]
    assert repair["name"] == "repair" and repair["kept"] and repair["after"] < repair["before"]
    assert repair["before"] == ruin["before"]                     # the ruin was not kept
    assert repair["train_samples"] == 8 and repair["heldout_samples"] == 1   # auto: 4x the pass's 2; 10%, at least 1
    a = load_file(str(tmp_path / "plain" / "model-block-00001.safetensors"))
    b = load_file(str(tmp_path / "q" / "model-block-00001.safetensors"))
    assert torch.equal(a["model.layers.1.mlp.down_proj.weight_scale"], b["model.layers.1.mlp.down_proj.weight_scale"])
    assert torch.equal(a["model.layers.1.self_attn.o_proj.weight_scale"] * 2, b["model.layers.1.self_attn.o_proj.weight_scale"])
    assert torch.equal(a["model.layers.1.self_attn.o_proj.weight_packed"], b["model.layers.1.self_attn.o_proj.weight_packed"])
    assert not (tmp_path / "q.onecomp-refine").exists() and rep["summary"]["stage"] == "refined"
    assert plain["refine"] == []


def test_a_model_refiner_must_keep_the_format_and_bits(tiny_llama, tmp_path):
    with pytest.raises(OnecompError, match="model refiner 'wrongbits' changed how model.layers.0.mlp.up_proj is "
                                           "stored .*keep the module's format and bits"):
        onecomp_core.quantize(tiny_llama, tmp_path / "q", plugins=[RefinerPlugin()], refiners=["wrongbits"],
                              **quick())


def test_a_candidate_is_written_file_by_file_even_where_a_module_spans_two_files(tiny_llama, tmp_path):
    """write_candidate makes each module's stored form just before its file is written; a module
    whose tensors lie in two files (a sharded checkpoint) gets each in its own file."""
    import json as _json
    import shutil
    from safetensors.torch import save_file
    from onecomp_core.checkpoint import quantized_tensors, read_meta
    from onecomp_core.plugins import load_plugins
    from onecomp_core.refine_stage import write_candidate
    from onecomp_core.spec import LayerSpec
    q = tmp_path / "q"
    onecomp_core.quantize(tiny_llama, q, bits=4, group_size=32, projector="rtn", num_samples=2, seq_len=32)
    name = "model.layers.0.mlp.down_proj"
    index_path = q / "model.safetensors.index.json"
    index = _json.loads(index_path.read_text())
    home = q / index["weight_map"][f"{name}.weight_scale"]
    t = load_file(str(home))
    save_file({f"{name}.weight_scale": t.pop(f"{name}.weight_scale")}, str(q / "model-extra.safetensors"),
              metadata={"format": "pt"})
    save_file(t, str(home), metadata={"format": "pt"})
    index["weight_map"][f"{name}.weight_scale"] = "model-extra.safetensors"
    index_path.write_text(_json.dumps(index))
    plugins = load_plugins()
    qts = quantized_tensors(q, plugins.registry)
    changed = {n: qt for n, qt in qts.items() if n.startswith("model.layers.0.")}
    for qt in changed.values():
        qt.scale.mul_(2)
    names = {a.name for a in LayerSpec.__attrs_attrs__}
    plan = {n: LayerSpec(**{k: v for k, v in m.items() if k in names}) for n, m in read_meta(q)["modules"].items()}
    formats = {"uniform": plugins.registry.get("format", "uniform")(plugins.registry.get("format", "uniform").Options())}
    write_candidate(q, tmp_path / "next", "double", changed, plan, formats)
    again = quantized_tensors(tmp_path / "next", plugins.registry)
    for n, qt in qts.items():
        assert torch.equal(again[n].scale, qt.scale) and torch.equal(again[n].codes, qt.codes), n
    assert set(load_file(str(tmp_path / "next" / "model-extra.safetensors"))) == {f"{name}.weight_scale"}
    changed[name] = type(qts[name])(codes=qts[name].codes[:, :-1], scale=qts[name].scale, zero=qts[name].zero,
                                    bits=4, group_size=32, symmetric=False)
    shutil.rmtree(tmp_path / "next")
    with pytest.raises(OnecompError, match="changed how model.layers.0"):
        write_candidate(q, tmp_path / "next", "cut", changed, plan, formats)
    assert not (tmp_path / "next").exists()                           # nothing half-written is left


CORE_ONLY = """
import sys
import onecomp_core
from onecomp_core.errors import OnecompError
rep = onecomp_core.quantize(sys.argv[1], sys.argv[2], bits=4, group_size=32, num_samples=2, seq_len=32)
assert rep["config"]["projector"] == "rtn", rep["config"]["projector"]
try:
    onecomp_core.quantize(sys.argv[1], sys.argv[2] + "-g", projector="gptq", num_samples=2, seq_len=32)
except OnecompError as e:
    print(e)
"""


def test_with_only_the_core_rtn_runs_and_a_missing_plugin_names_its_distribution(tiny_llama, tmp_path):
    env = {**os.environ, "ONECOMP_DISABLE_PLUGIN_AUTOLOAD": "1", "ONECOMP_PROGRESS": "0"}
    proc = subprocess.run([sys.executable, "-c", CORE_ONLY, str(tiny_llama), str(tmp_path / "q")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "unknown projector 'gptq'; known: rtn; it is provided by onecomp-plugins-gptq" in proc.stdout
    assert "projector rtn (install onecomp-plugins-gptq" in proc.stderr
    assert json.loads((tmp_path / "q" / "report.json").read_text())["summary"]["bpw"] > 4


def test_overwrite_after_a_killed_refine_stage_starts_the_refine_stage_afresh(tiny_llama, tmp_path):
    """A stale refine work folder (records of a refiner done) must not survive --overwrite."""
    import json as _json
    kw = dict(plugins=[RefinerPlugin()], bits=4, group_size=32, projector="rtn", num_samples=2, seq_len=32)
    rep = onecomp_core.quantize(tiny_llama, tmp_path / "q", refiners=["halve", "repair"], **kw)
    work = tmp_path / "q.onecomp-refine"
    work.mkdir()
    fp = _json.loads((tmp_path / "q" / "onecomp.json").read_text())["fingerprint"]
    (work / "state.json").write_text(_json.dumps({"fingerprint": fp, "records": [{"name": "repair", "kept": False}]}))
    again = onecomp_core.quantize(tiny_llama, tmp_path / "q", refiners=["halve", "repair"], overwrite=True, **kw)
    assert again["refine"][0]["kept"] and again["refine"][0]["after"] == rep["refine"][0]["after"]


@pytest.mark.skipif(not (installed("refiner", "blockptq") and installed("refiner", "globalptq")),
                    reason="needs the blockptq and globalptq distributions")
def test_a_block_step_on_a_saved_pivot_never_loads_the_whole_fp_model(tiny_llama, tmp_path, monkeypatch):
    """The stage is judged against the FP model's log-probs measured block by block; the FP
    model itself is loaded only for a refiner that asks for it (blockptq's block step does not)."""
    import onecomp_core.runner
    onecomp_core.quantize(tiny_llama, tmp_path / "q", bits=4, group_size=32, projector="rtn", num_samples=4, seq_len=32)
    loads = []
    whole = onecomp_core.runner.load_reference
    monkeypatch.setattr(onecomp_core.runner, "load_reference", lambda *a, **k: loads.append(a) or whole(*a, **k))
    rep = onecomp_core.refine(tmp_path / "q", refiners=["blockptq"], options={"blockptq": {"epochs": 1}})
    assert [(r["name"], r["scope"]) for r in rep["refine"]] == [("blockptq", "block")] and loads == []
    onecomp_core.refine(tmp_path / "q", refiners=["globalptq"], options={"globalptq": {"epochs": 1}})
    assert len(loads) == 1                                      # a model refiner that asks loads it once


@pytest.mark.skipif(not (installed("refiner", "blockptq") and installed("refiner", "globalptq")),
                    reason="needs the blockptq and globalptq distributions")
def test_refine_auto_on_a_saved_pivot_runs_what_fits_and_leaves_the_pivot_where_nothing_does(tiny_llama, tmp_path,
                                                                                              capsys):
    q = tmp_path / "q"
    onecomp_core.quantize(tiny_llama, q, bits=4, group_size=32, projector="rtn", num_samples=4, seq_len=32)
    files = {p.name: p.read_bytes() for p in q.glob("*.safetensors")}
    with pytest.raises(OnecompError, match="--refine auto"):
        onecomp_core.refine(q)
    capsys.readouterr()
    # nothing fits 1 MB: both are estimated (blockptq's pass over the blocks with its timed probe) and skipped
    rep = onecomp_core.refine(q, refine="auto", max_memory="1MB")
    assert [(r["name"], r["scope"], r["skipped"]) for r in rep["refine"]] == [("blockptq", "block", True),
                                                                              ("globalptq", "model", True)]
    assert all(r["why"].startswith("needs ~") and "max-memory" in r["why"] for r in rep["refine"])
    choice = {d["name"]: d for d in rep["refine_choice"]}
    assert not choice["blockptq"]["run"] and choice["blockptq"]["predicted_peak_mb"] > 1
    assert choice["blockptq"]["predicted_seconds"] > 0
    assert choice["globalptq"]["predicted_seconds"] is None         # its probe trains the student: not where it cannot fit
    assert {p.name: p.read_bytes() for p in q.glob("*.safetensors")} == files      # DIR: still the pivot
    err = capsys.readouterr().err
    assert "onecomp: blockptq skipped: needs ~" in err and "onecomp: globalptq skipped: needs ~" in err
    # the machine's memory and no time budget: both run, blockptq over the blocks first
    opts = {"blockptq": {"epochs": 1}, "globalptq": {"epochs": 1}}
    rep = onecomp_core.refine(q, refine="auto", options=opts)
    new = rep["refine"][-2:]
    assert [(r["name"], r["scope"]) for r in new] == [("blockptq", "block"), ("globalptq", "model")]
    assert not any(r.get("skipped") for r in new) and all(d["run"] for d in rep["refine_choice"][-2:])
    onecomp_core.load_quantized(q)


@pytest.mark.skipif(not (installed("refiner", "blockptq") and installed("preprocessor", "hadamard")),
                    reason="needs the blockptq and rotation distributions")
def test_refine_auto_leaves_out_a_block_refiner_that_cannot_run_on_the_checkpoint(tiny_llama, tmp_path, capsys,
                                                                                   monkeypatch):
    q = tmp_path / "rotated"
    onecomp_core.quantize(tiny_llama, q, bits=4, group_size=32, projector="rtn", num_samples=4, seq_len=32,
                          preprocessors=["hadamard"])
    with pytest.raises(OnecompError, match="was transformed first"):            # named: an error, as before
        onecomp_core.refine(q, refiners=["blockptq"])
    rep = onecomp_core.refine(q, refine="auto", max_memory="1MB")
    choice = {d["name"]: d for d in rep["refine_choice"]}
    assert not choice["blockptq"]["run"] and "was transformed first" in choice["blockptq"]["reason"]
    assert "blockptq" not in [r["name"] for r in rep["refine"]]
    assert "onecomp: blockptq skipped: refiner 'blockptq' on a finished checkpoint" in capsys.readouterr().err
    monkeypatch.setattr(onecomp_core.resolve, "AUTO_REFINERS", ("blockptq",))       # nothing else to add
    with pytest.raises(OnecompError, match="--refine auto found no refiner that can act on"):
        onecomp_core.refine(q, refine="auto")


def test_the_refine_command_takes_the_budget_flags(tiny_llama, tmp_path, capsys):
    q = tmp_path / "q"
    onecomp_core.quantize(tiny_llama, q, bits=4, group_size=32, projector="rtn", num_samples=4, seq_len=32)
    capsys.readouterr()
    assert main(["refine", str(q)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--refiner NAME" in err and "--refine auto" in err
    assert main(["refine", str(q), "--refine", "auto", "--time-budget", "soon"]) == 2
    assert "'time_budget': must be a duration such as 45m" in capsys.readouterr().err
    assert main(["refine", str(q), "--refine", "auto", "--max-memory", "1MB"]) == 0
    out = capsys.readouterr().out
    # each skipped refiner says why: here its memory, not the time budget
    assert re.search(r"blockptq \(its blocks\): skipped \(needs ~[\d.]+ \w+, max-memory [\d.]+ \w+\), held-out KL", out)
    assert re.search(r"globalptq: skipped \(needs ~[\d.]+ \w+, max-memory", out)


@pytest.mark.skipif(not (installed("preprocessor", "hadamard") and installed("preprocessor", "awq")),
                    reason="needs the rotation and awq distributions")
def test_preprocessors_chain_in_config_order_and_keep_the_function(tiny_llama, tmp_path):
    """--preprocessor hadamard --preprocessor awq: awq is fitted on the rotated model, both are
    fused, and the checkpoint (8 bits, float32 storage) computes the source model's function."""
    from transformers import AutoModelForCausalLM
    out = tmp_path / "q"
    rep = onecomp_core.quantize(tiny_llama, out, preprocessors=["hadamard", "awq"], bits=8, group_size=32,
                                projector="rtn", num_samples=2, seq_len=32, store_dtype="float32")
    assert [p["name"] for p in rep["preprocessors"]] == ["hadamard", "awq"]
    assert rep["preprocessors"][1]["groups"] > 0
    src = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    ids = torch.randint(3, 300, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, got = src(ids).logits, onecomp_core.load_quantized(out, "cpu")(ids).logits
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 0.05
    stored = {k: t for f in out.glob("*.safetensors") for k, t in load_file(str(f)).items()}
    gains = [t for k, t in stored.items() if k.endswith("input_layernorm.weight")]
    assert gains and not all(torch.equal(g, torch.ones_like(g)) for g in gains)   # awq's 1/s after hadamard's fold
