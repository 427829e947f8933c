import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import load_file

import onecomp_core
from onecomp_core.sdk import BlockRefiner, OnecompError, hookimpl, load_plugins
from onecomp_core.testing import ARCHS
from onecomp_plugin_globalptq import attach_views, distill, entropy, hidden_cosine, kl_loss, unfrozen
from onecomp_plugin_globalptq.distill import sam_perturb, sam_restore
from onecomp_plugin_globalptq.plugin import GlobalPTQ, GlobalPTQOptions
from onecomp_plugin_globalptq.student import block_of

KW = dict(bits=2, group_size=32, projector="rtn", num_samples=6, seq_len=32)


def test_registered_at_model_scope():
    assert load_plugins().registry.get("refiner", "globalptq") is GlobalPTQ
    assert GlobalPTQ.scopes() == ("model",) and GlobalPTQ.needs_trainable


def test_losses():
    t, s = torch.randn(3, 7, 11), torch.randn(3, 7, 11)
    assert float(kl_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    pt, ls = torch.softmax(t, -1), torch.log_softmax(s, -1)
    manual = (pt * (torch.log(pt) - ls)).sum(-1).mean()
    assert float(kl_loss(s, t)) == pytest.approx(float(manual), rel=1e-5)
    assert float(kl_loss(s, t, 2.0)) == pytest.approx(float(4 * kl_loss(s / 2, t / 2)), rel=1e-5)   # T^2 KL at T
    assert float(entropy(torch.zeros(2, 5, 8))) == pytest.approx(float(torch.log(torch.tensor(8.0))), rel=1e-6)
    assert float(hidden_cosine([t], [t])) == pytest.approx(0.0, abs=1e-6)
    assert float(hidden_cosine([t], [-t])) == pytest.approx(2.0, rel=1e-6)


def test_progressive_unfreezing_from_the_output_side():
    assert list(unfrozen(0, 3, 6, True)) == [4, 5]
    assert list(unfrozen(1, 3, 6, True)) == [2, 3, 4, 5]
    assert list(unfrozen(2, 3, 6, True)) == list(range(6))
    assert list(unfrozen(0, 3, 6, False)) == list(range(6))
    assert block_of("model.layers.12.mlp.up_proj") == 12 and block_of("lm_head") == -1


def test_sam_perturbs_along_the_gradient_and_restores():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    p.grad = torch.tensor([3.0, 4.0])
    eps = sam_perturb([p], 0.5)
    assert torch.allclose(p.detach(), torch.tensor([1.3, 2.4]))
    sam_restore([p], eps)
    assert torch.allclose(p.detach(), torch.tensor([1.0, 2.0]))


def test_refined_checkpoint_keeps_codes_format_and_bits(tiny_llama, tmp_path):
    kw = {**KW, "num_samples": 12}        # the held-out samples lie across the text: 6 are too few to generalise
    a = onecomp_core.quantize(tiny_llama, tmp_path / "a", **kw)
    b = onecomp_core.quantize(tiny_llama, tmp_path / "b", refiners=["globalptq"],
                              options={"globalptq": {"epochs": 3, "lr_scales": 2e-2}}, **kw)
    rec = b["refine"][0]
    assert rec["name"] == "globalptq" and rec["kept"] and rec["after"] < rec["before"]
    assert b["summary"]["bpw"] == a["summary"]["bpw"]
    changed = []
    for f in ("model-block-00000.safetensors", "model-block-00001.safetensors"):
        fa, fb = load_file(str(tmp_path / "a" / f)), load_file(str(tmp_path / "b" / f))
        assert fa.keys() == fb.keys()
        assert all(fa[k].shape == fb[k].shape and fa[k].dtype == fb[k].dtype for k in fa)
        changed += [k for k in fa if not torch.equal(fa[k], fb[k])]
        assert all(torch.equal(fa[k], fb[k]) for k in fa if k.endswith("weight_packed"))   # codes frozen by default
    assert changed and all(k.endswith(("weight_scale", "weight_zero_point")) for k in changed)
    model = onecomp_core.load_quantized(tmp_path / "b")
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(3, 300, (1, 8))).logits).all()


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from([1e-3, 5e-2, 0.9]), st.booleans(), st.integers(0, 3))
def test_never_worse_on_the_heldout_samples(tiny_llama, tmp_path_factory, lr, codes, seed):
    """Whatever the options, the checkpoint left behind has a held-out KL no higher than the
    pivot's: a worse result is discarded and the pivot's blocks stay."""
    d = tmp_path_factory.mktemp("g")
    onecomp_core.quantize(tiny_llama, d / "pivot", **KW)
    rep = onecomp_core.quantize(tiny_llama, d / "q", refiners=["globalptq"], **KW,
                                options={"globalptq": {"epochs": 2, "lr_scales": lr, "lr_codes": lr,
                                                       "train_codes": codes, "seed": seed}})
    rec = rep["refine"][0]
    assert rec["kept"] == (rec["after"] <= rec["before"])
    if not rec["kept"]:
        for f in ("model-block-00000.safetensors", "model-block-00001.safetensors"):
            a, b = load_file(str(d / "pivot" / f)), load_file(str(d / "q" / f))
            assert all(torch.equal(a[k], b[k]) for k in a)


def _student(tiny_llama, tmp_path):
    onecomp_core.quantize(tiny_llama, tmp_path / "p", **KW)
    from transformers import AutoModelForCausalLM
    from onecomp_core.sdk import quantized_tensors
    ps = load_plugins()
    model = onecomp_core.load_quantized(tmp_path / "p")
    qts = quantized_tensors(tmp_path / "p", ps.registry)
    import json
    meta = json.loads((tmp_path / "p" / "onecomp.json").read_text())["modules"]
    from onecomp_core.sdk import LayerSpec
    plan = {n: LayerSpec(name=n, bits=m["bits"], group_size=m["group_size"], symmetric=m["symmetric"],
                         projector=m.get("projector", "rtn"), format=m["format"]) for n, m in meta.items()}
    fmt = {"uniform": ps.registry.get("format", "uniform")()}
    views = attach_views(model, qts, plan, fmt)
    model.float()
    teacher = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()
    return model, teacher, views


def test_a_run_stopped_after_an_epoch_resumes_to_the_same_result(tiny_llama, tmp_path):
    ids = torch.randint(3, 300, (4, 16))
    o = GlobalPTQOptions(epochs=3, lr_scales=1e-2, train_codes=True, lr_codes=1e-2)
    model, teacher, views = _student(tiny_llama, tmp_path)
    straight = distill(model, teacher, views, ids, o)
    want = {n: v.write_back() for n, v in views.items()}

    import onecomp_plugin_globalptq.train as T
    saves = []
    real = T.save_state

    def save_then_stop(path, state):
        real(path, state)
        saves.append(1)
        if len(saves) == 1:
            raise KeyboardInterrupt          # stopped right after epoch 1 was saved

    state = tmp_path / "scratch" / "state.pt"
    model, teacher, views = _student(tiny_llama, tmp_path / "x")
    T.save_state = save_then_stop
    try:
        with pytest.raises(KeyboardInterrupt):
            distill(model, teacher, views, ids, o, state)
    finally:
        T.save_state = real
    model, teacher, views = _student(tiny_llama, tmp_path / "y")       # a fresh process would start here
    resumed = distill(model, teacher, views, ids, o, state)
    assert resumed == pytest.approx(straight, rel=1e-6, abs=1e-9)
    for n, v in views.items():
        got = v.write_back()
        assert torch.equal(got.codes, want[n].codes) and torch.allclose(got.scale, want[n].scale)


@pytest.mark.parametrize("arch", ARCHS)
def test_globalptq_on_every_architecture(arch, tiny_models, tmp_path):
    rep = onecomp_core.quantize(tiny_models(arch), tmp_path / "q", refiners=["globalptq"],
                                options={"globalptq": {"epochs": 1}}, **{**KW, "num_samples": 3})
    assert rep["refine"][0]["name"] == "globalptq"
    model = onecomp_core.load_quantized(tmp_path / "q")
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(3, 300, (1, 8))).logits).all()


def test_options_hidden_entropy_sam_progressive_run(tiny_llama, tmp_path):
    rep = onecomp_core.quantize(tiny_llama, tmp_path / "q", refiners=["globalptq"], **KW,
                                options={"globalptq": {"epochs": 2, "hidden_weight": 0.5, "entropy_weight": 0.01,
                                                       "sam_rho": 0.05, "progressive": True, "checkpointing": True}})
    rec = rep["refine"][0]
    assert rec["modules"] == 14 and rec["after"] >= 0


def _same_files(a, b, pattern="*.safetensors"):
    names = sorted(p.name for p in a.glob(pattern))
    assert names == sorted(p.name for p in b.glob(pattern)) and names
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


OPTS = {"globalptq": {"epochs": 2, "lr_scales": 2e-2}}


def test_refine_on_a_saved_pivot_equals_the_stages_run_inline(tiny_llama, tmp_path):
    import json
    inline = onecomp_core.quantize(tiny_llama, tmp_path / "inline", refiners=["globalptq"], options=OPTS, **KW)
    pivot = onecomp_core.quantize(tiny_llama, tmp_path / "later", **KW)
    assert pivot["summary"]["stage"] == "pivot"
    later = onecomp_core.refine(tmp_path / "later", refiners=["globalptq"], options=OPTS)
    assert later["refine"][0]["kept"] and later["summary"]["stage"] == "refined"
    assert later["refine"][0]["after"] == pytest.approx(inline["refine"][0]["after"], rel=1e-6)
    _same_files(tmp_path / "inline", tmp_path / "later")
    saved = json.loads((tmp_path / "later" / "report.json").read_text())
    assert saved["refine"] == later["refine"] and saved["layers"] == pivot["layers"]
    assert not (tmp_path / "later.onecomp-refine").exists()


class Inner(BlockRefiner):
    name = "inner"


class InnerPlugin:
    @hookimpl
    def onecomp_register_refiners(self, registry):
        registry.add_refiner(Inner)


def test_refine_cli_and_its_errors_leave_the_folder_untouched(tiny_llama, tmp_path, capsys):
    from onecomp_core.testing import cli as main
    d = tmp_path / "q"
    onecomp_core.quantize(tiny_llama, d, **KW)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    assert main(["refine", str(d), "--refiner", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown refiner 'nope'" in err and err.count("\n") == 0
    with pytest.raises(OnecompError, match="refiner 'inner' works inside the layer-wise pass.*--refiner inner"):
        onecomp_core.refine(d, refiners=["inner"], plugins=[InnerPlugin()])
    assert main(["refine", str(tmp_path / "missing"), "--refiner", "globalptq"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert main(["refine", str(d), "--refiner", "globalptq", "--option", "globalptq.epochs=1",
                 "--option", "globalptq.lr_scales=0.02"]) == 0
    assert "globalptq: held-out KL" in capsys.readouterr().out


KILLER = """
import os, signal, sys
import onecomp_core
import onecomp_plugin_globalptq.train as T
real = T.save_state
def save_then_die(path, state):
    real(path, state)
    os.kill(os.getpid(), signal.SIGKILL)          # epoch 1 saved, the run killed
T.save_state = save_then_die
onecomp_core.quantize(sys.argv[1], sys.argv[2], refiners=["globalptq"], options={opts!r}, **{kw!r})
"""


@pytest.mark.whole_suite
def test_sigkill_during_globalptq_leaves_the_pivot_and_a_rerun_resumes(tiny_llama, tmp_path):
    import json
    import os
    import subprocess
    import sys
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILLER.format(opts=OPTS, kw=KW), str(tiny_llama), str(out)],
                          capture_output=True, text=True, env={**os.environ, "ONECOMP_PROGRESS": "0"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert json.loads((out / "report.json").read_text())["summary"]["stage"] == "pivot"     # DIR: the pivot
    assert (tmp_path / "killed.onecomp-refine" / "refiner-globalptq" / "state.pt").is_file()
    onecomp_core.load_quantized(out)
    rep = onecomp_core.quantize(tiny_llama, out, refiners=["globalptq"], options=OPTS, **KW)    # the same command
    assert rep["summary"]["stage"] == "refined" and [r["name"] for r in rep["refine"]] == ["globalptq"]
    onecomp_core.quantize(tiny_llama, tmp_path / "straight", refiners=["globalptq"], options=OPTS, **KW)
    _same_files(out, tmp_path / "straight")
    assert not (tmp_path / "killed.onecomp-refine").exists()


def test_refine_auto_adds_globalptq_where_it_fits_and_skips_it_where_it_does_not(tiny_llama, tmp_path, capsys):
    rep = onecomp_core.quantize(tiny_llama, tmp_path / "fits", refine="auto", options=OPTS, **KW)
    names = [d["name"] for d in rep["refine_choice"]]
    assert "globalptq" in names and rep["refine"][-1]["name"] == "globalptq" and not rep["refine"][-1].get("skipped")
    d = rep["refine_choice"][names.index("globalptq")]
    assert d["run"] and d["predicted_peak_mb"] > 0 and d["predicted_seconds"] > 0
    assert "| predicted peak MB |" in (tmp_path / "fits" / "report.md").read_text()
    rep = onecomp_core.quantize(tiny_llama, tmp_path / "late", refine="auto", time_budget=0.001, options=OPTS, **KW)
    rec = rep["refine"][-1]
    assert rec["name"] == "globalptq" and rec["skipped"] and not rec["kept"] and rep["summary"]["stage"] == "pivot"
    assert "onecomp: globalptq skipped: needs ~" in capsys.readouterr().err
    onecomp_core.load_quantized(tmp_path / "late")
