import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import load_file

import onecomp_core
from onecomp_core.sdk import Format, UniformFormat, hookimpl, load_plugins
from onecomp_core.testing import ARCHS, installed
from onecomp_plugin_blockptq import block_loss, lr_factor, reconstruct, split_rows, temperature
from onecomp_plugin_blockptq.plugin import BlockPTQ

KW = dict(bits=2, group_size=32, projector="rtn", num_samples=6, seq_len=32)


def test_registered_at_block_scope_and_at_model_scope_with_windows():
    assert load_plugins().registry.get("refiner", "blockptq") is BlockPTQ
    assert BlockPTQ.scopes() == ("block", "model") and BlockPTQ.needs_trainable
    assert BlockPTQ().active_scopes() == ("block",)
    assert BlockPTQ(BlockPTQ.Options(windows=True)).active_scopes() == ("block", "model")


def test_schedules():
    lrs = [lr_factor(s, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)     # 10% linear warm-up
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] < 0.001                   # then cosine to ~0
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert temperature(0, 50, 1.0, 0.05) == pytest.approx(1.0)
    assert temperature(49, 50, 1.0, 0.05) == pytest.approx(0.05)


@given(st.integers(1, 200), st.floats(0.0, 0.9), st.integers(0, 100))
def test_heldout_split_is_disjoint_and_complete(n, share, seed):
    train, held = split_rows(n, share, seed)
    if n == 1:
        assert train == held == [0]
        return
    assert set(train).isdisjoint(held) and sorted(train + held) == list(range(n))
    assert 1 <= len(held) <= n - 1


def test_block_loss_adds_the_cosine_term():
    y, t = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    mse = ((y - t) ** 2).mean()
    assert block_loss(y, t, 0.0) == pytest.approx(float(mse))
    assert block_loss(y, y, 3.0) == pytest.approx(0.0, abs=1e-6)
    assert block_loss(y, t, 1.0) > mse


def tiny_block(tiny_llama, bits=2, group_size=32):
    """A tiny model's first block with its linears RTN-quantized, uniform views over them, its
    inputs and the FP block's outputs."""
    from transformers import AutoModelForCausalLM
    from onecomp_core.sdk import GridOptions, LayerSpec
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    block = model.model.layers[0]
    torch.manual_seed(0)
    h = torch.randn(6, 16, 64)
    kw = {"position_embeddings": model.model.rotary_emb(h, torch.arange(16)[None]), "attention_mask": None}
    with torch.no_grad():
        target = block(h, **kw)[0] if isinstance(block(h, **kw), tuple) else block(h, **kw)
    reg = load_plugins().registry
    fmt = reg.get("format", "uniform")()
    rtn = reg.get("projector", "rtn")()
    views, qts = {}, {}
    for rel in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
        lin = block.get_submodule(rel)
        spec = LayerSpec(name=rel, bits=bits, group_size=group_size, symmetric=False, projector="rtn", format="uniform")
        qts[rel] = rtn.project(lin.weight.detach().float(), None, spec, fmt)
        with torch.no_grad():
            lin.weight.copy_(qts[rel].dequantize(torch.float32))
        views[rel] = fmt.trainable(qts[rel], spec)
    return block, views, qts, h, target, kw


def test_reconstruct_lowers_the_training_loss_and_writes_back_valid_tensors(tiny_llama):
    from onecomp_core.sdk import block_error
    block, views, qts, h, target, kw = tiny_block(tiny_llama)
    before = block_error(block, h, target, kw)
    hist = reconstruct(block, views, h, target, kw, list(range(6)), epochs=6, batch=2,
                       lr={"scales": 1e-2, "codes": 2e-2}, train={}, beta=0.0, tau0=1.0, tau1=0.05, clip=1.0, seed=0)
    assert len(hist) == 6 and hist[-1] < hist[0]
    for rel, v in views.items():
        new = v.write_back()
        assert new.codes.dtype == torch.uint8 and int(new.codes.max()) <= 3        # codes on the 2-bit grid
        assert new.codes.shape == qts[rel].codes.shape and new.scale.shape == qts[rel].scale.shape
        assert torch.equal(new.zero, new.zero.round())                              # integral zero points
        with torch.no_grad():
            block.get_submodule(rel).weight.copy_(new.dequantize(torch.float32))
    assert block_error(block, h, target, kw) < before
    assert isinstance(block.self_attn.q_proj, torch.nn.Linear)                     # the linears are back
    assert not any(p.requires_grad for p in block.parameters() if p.dtype == torch.bool)


def test_codes_stay_frozen_when_asked(tiny_llama):
    block, views, qts, h, target, kw = tiny_block(tiny_llama)
    reconstruct(block, views, h, target, kw, list(range(6)), epochs=2, batch=3, lr={"scales": 1e-2, "codes": 1.0},
                train={"codes": False}, beta=0.5, tau0=1.0, tau1=0.1, clip=1.0, seed=0)
    for rel, v in views.items():
        assert torch.equal(v.write_back().codes, qts[rel].codes)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(2, 4), st.integers(0, 3), st.sampled_from([1e-3, 3e-2, 1.0]))
def test_a_block_never_leaves_with_a_worse_heldout_error(tiny_llama, tmp_path_factory, bits, seed, lr):
    """Whatever the options (even a learning rate that wrecks training), every block's held-out
    error after blockptq is at most what it was before."""
    out = tmp_path_factory.mktemp("q") / "q"
    rep = onecomp_core.quantize(tiny_llama, out, bits=bits, group_size=32, projector="rtn", num_samples=5, seq_len=32,
                                refiners=["blockptq"],
                                options={"blockptq": {"epochs": 2, "lr_codes": lr, "lr_scales": lr, "seed": seed}})
    recs = {li["blockptq"]["heldout_before"]: li["blockptq"] for li in rep["layers"].values()}
    assert len(recs) == 2                                     # one record per block
    for r in recs.values():
        final = r["heldout_after"] if r["kept"] else r["heldout_before"]
        assert final <= r["heldout_before"]
        assert r["kept"] == (r["heldout_after"] < r["heldout_before"])


def test_refined_checkpoint_keeps_format_and_bits_and_loads(tiny_llama, tmp_path):
    a = onecomp_core.quantize(tiny_llama, tmp_path / "a", **KW)
    b = onecomp_core.quantize(tiny_llama, tmp_path / "b", refiners=["blockptq"],
                              options={"blockptq": {"epochs": 3, "lr_codes": 2e-2}}, **KW)
    assert b["summary"]["bpw"] == a["summary"]["bpw"]
    assert any(li["blockptq"]["kept"] for li in b["layers"].values())
    changed = []
    for f in ("model-block-00000.safetensors", "model-block-00001.safetensors"):
        fa, fb = load_file(str(tmp_path / "a" / f)), load_file(str(tmp_path / "b" / f))
        assert fa.keys() == fb.keys()
        for k in fa:
            assert fa[k].shape == fb[k].shape and fa[k].dtype == fb[k].dtype
        changed += [k for k in fa if not torch.equal(fa[k], fb[k])]
    assert changed and all(k.endswith(("weight_packed", "weight_scale", "weight_zero_point")) for k in changed)
    model = onecomp_core.load_quantized(tmp_path / "b")
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(3, 300, (1, 8))).logits).all()


KILLER = textwrap.dedent("""
    import os, signal
    import onecomp_core
    import onecomp_plugin_blockptq.plugin as P

    calls = []
    original = P.reconstruct

    def reconstruct_then_die(*a, **kw):
        out = original(*a, **kw)
        calls.append(1)
        if len(calls) == 2:                                 # block 1 trained, not yet committed
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    P.reconstruct = reconstruct_then_die
    {call}
""")


@pytest.mark.whole_suite
def test_sigkill_during_blockptq_then_rerun_gives_the_same_bytes(tiny_models, tmp_path):
    model = tiny_models("qwen3")
    out = tmp_path / "killed"
    call = f'onecomp_core.quantize({str(model)!r}, {str(out)!r}, refiners=["blockptq"], options={{"blockptq": {{"epochs": 2}}}}, **{KW!r})'
    proc = subprocess.run([sys.executable, "-c", KILLER.format(call=call)],
                          capture_output=True, text=True, env={**os.environ, "ONECOMP_PROGRESS": "0"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not out.exists()
    opts = {"blockptq": {"epochs": 2}}
    rep = onecomp_core.quantize(model, out, refiners=["blockptq"], options=opts, **KW)
    assert rep["summary"]["resumed_from_block"] == 1
    onecomp_core.quantize(model, tmp_path / "straight", refiners=["blockptq"], options=opts, **KW)
    for f in sorted(p.name for p in (tmp_path / "straight").glob("*.safetensors")):
        assert (out / f).read_bytes() == (tmp_path / "straight" / f).read_bytes(), f


def _quantized_files(folder):
    return {p.name: load_file(str(p)) for p in sorted(folder.glob("model-block-*.safetensors"))}


def test_blockptq_refines_a_saved_pivot_as_it_would_inside_the_pass(tiny_llama, tmp_path, capsys):
    from onecomp_core.testing import cli as main
    opts = {"blockptq": {"epochs": 2, "lr_codes": 2e-2}}
    inline = onecomp_core.quantize(tiny_llama, tmp_path / "inline", refiners=["blockptq"], options=opts, **KW)
    pivot = onecomp_core.quantize(tiny_llama, tmp_path / "later", **KW)
    later = onecomp_core.refine(tmp_path / "later", refiners=["blockptq"], options=opts)
    rec = later["refine"][-1]
    assert rec["name"] == "blockptq" and rec["scope"] == "block" and rec["modules"] == len(pivot["plan"])
    assert rec["kept"] == (rec["after"] < rec["before"]) and rec["kept"]
    assert later["summary"]["stage"] == "refined" and later["summary"]["bpw"] == pivot["summary"]["bpw"]
    # RTN's codes do not depend on the stream, so the refined blocks are the inline run's, bit for bit
    a, b = _quantized_files(tmp_path / "inline"), _quantized_files(tmp_path / "later")
    assert a.keys() == b.keys() and a
    for f in a:
        assert a[f].keys() == b[f].keys()
        for k in a[f]:
            assert torch.equal(a[f][k], b[f][k]), (f, k)
    assert inline["summary"]["bpw"] == later["summary"]["bpw"]
    assert not (tmp_path / "later.onecomp-refine").exists()
    # the CLI names the step; a second run refines the refined checkpoint again
    assert main(["refine", str(tmp_path / "later"), "--refiner", "blockptq", "--option", "blockptq.epochs=1"]) == 0
    assert "blockptq (its blocks): held-out KL" in capsys.readouterr().out


def test_refine_with_windows_runs_the_blocks_then_the_windows_each_judged(tiny_llama, tmp_path):
    onecomp_core.quantize(tiny_llama, tmp_path / "q", **KW)
    rep = onecomp_core.refine(tmp_path / "q", refiners=["blockptq"],
                              options={"blockptq": {"epochs": 1, "windows": True, "window_epochs": 1}})
    steps = [(r["name"], r.get("scope", "model")) for r in rep["refine"]]
    assert steps == [("blockptq", "block"), ("blockptq", "model")]
    first, second = rep["refine"]
    assert second["before"] == (first["after"] if first["kept"] else first["before"])    # judged on what stands


def test_blockptq_on_a_transformed_checkpoint_is_refused_before_any_work(tiny_llama, tmp_path):
    from onecomp_core.sdk import OnecompError
    if not installed("preprocessor", "hadamard"):
        pytest.skip("needs onecomp-plugin-rotation")
    d = tmp_path / "rot"
    onecomp_core.quantize(tiny_llama, d, preprocessors=["hadamard"], **KW)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    with pytest.raises(OnecompError, match="transformed first \\(hadamard\\).*--refiner blockptq"):
        onecomp_core.refine(d, refiners=["blockptq"])
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before





@pytest.mark.whole_suite
def test_sigkill_while_refining_a_saved_pivot_leaves_it_and_a_rerun_resumes(tiny_models, tmp_path):
    import shutil
    model = tiny_models("qwen3")
    onecomp_core.quantize(model, tmp_path / "pivot", **KW)
    for name in ("killed", "straight"):
        shutil.copytree(tmp_path / "pivot", tmp_path / name)
    pivot = _quantized_files(tmp_path / "pivot")
    out = tmp_path / "killed"
    call = f'onecomp_core.refine({str(out)!r}, refiners=["blockptq"], options={{"blockptq": {{"epochs": 2}}}})'
    proc = subprocess.run([sys.executable, "-c", KILLER.format(call=call)],
                          capture_output=True, text=True, env={**os.environ, "ONECOMP_PROGRESS": "0"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (tmp_path / "killed.onecomp-refine" / "refiner-blockptq-block").is_dir()
    assert {f: {k: t.tolist() for k, t in d.items()} for f, d in _quantized_files(out).items()} == \
        {f: {k: t.tolist() for k, t in d.items()} for f, d in pivot.items()}            # DIR: still the pivot
    import onecomp_plugin_blockptq.plugin as P
    calls = []
    original = P.reconstruct
    P.reconstruct = lambda *a, **kw: calls.append(1) or original(*a, **kw)
    try:
        rep = onecomp_core.refine(out, refiners=["blockptq"], options={"blockptq": {"epochs": 2}})
    finally:
        P.reconstruct = original
    blocks = {n.split(".")[2] for n in rep["plan"]}            # model.layers.I.*
    assert len(calls) == len(blocks) - 1                       # block 0 was finished before the kill
    onecomp_core.refine(tmp_path / "straight", refiners=["blockptq"], options={"blockptq": {"epochs": 2}})
    for f in sorted(p.name for p in (tmp_path / "straight").glob("*.safetensors")):
        assert (out / f).read_bytes() == (tmp_path / "straight" / f).read_bytes(), f


@pytest.mark.parametrize("arch", ARCHS)
def test_blockptq_on_every_architecture(arch, tiny_models, tmp_path):
    rep = onecomp_core.quantize(tiny_models(arch), tmp_path / "q", refiners=["blockptq"],
                                options={"blockptq": {"epochs": 1}}, **{**KW, "num_samples": 3})
    assert all("blockptq" in li for li in rep["layers"].values())
    model = onecomp_core.load_quantized(tmp_path / "q")
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(3, 300, (1, 8))).logits).all()


@pytest.mark.skipif(not installed("format", "dbf"), reason="needs onecomp-plugins-dbf")
def test_blockptq_trains_binary_factors(tiny_llama, tmp_path):
    kw = dict(format="dbf", projector="dbf", target_bpw=1.5, num_samples=5, seq_len=32)
    a = onecomp_core.quantize(tiny_llama, tmp_path / "a", **kw)
    b = onecomp_core.quantize(tiny_llama, tmp_path / "b", refiners=["blockptq"],
                              options={"blockptq": {"epochs": 3}}, **kw)
    assert b["summary"]["bpw"] == a["summary"]["bpw"]
    assert all("blockptq" in li for li in b["layers"].values())


class NoViewFormat(UniformFormat):
    """The uniform format without a trainable view, as a third-party format might be."""
    name = "noview"
    trainable = Format.trainable


class NoViewPlugin:
    @hookimpl
    def onecomp_register_formats(self, registry):
        registry.add_format(NoViewFormat)


def test_a_format_without_a_trainable_view_is_refused_before_any_work(tiny_llama, tmp_path):
    from onecomp_core.sdk import OnecompError
    out = tmp_path / "q"
    with pytest.raises(OnecompError) as e:
        onecomp_core.quantize(tiny_llama, out, plugins=[NoViewPlugin()], format="noview", refiners=["blockptq"], **KW)
    msg = str(e.value)
    assert "\n" not in msg and "noview" in msg and "NoViewFormat.trainable" in msg and "--refiner blockptq" in msg
    assert not out.exists() and not (tmp_path / "q.onecomp-partial" / "blocks" / "block-00000.safetensors").exists()
    rep = onecomp_core.quantize(tiny_llama, out, plugins=[NoViewPlugin()], format="noview", **KW)   # fine without it
    assert rep["summary"]["bpw"] > 2


def test_estimate_scales_with_the_options():
    import types
    cfg = types.SimpleNamespace(hidden_size=64, intermediate_size=128, num_attention_heads=4)
    ctx = types.SimpleNamespace(model_config=cfg, num_blocks=3, block_weights=10_000, block_params=12_000,
                                train_samples=20, seq_len=32, device=torch.device("cpu"), time_block_step=lambda: 0.01)
    a = BlockPTQ(BlockPTQ.Options(epochs=2)).estimate(ctx)
    b = BlockPTQ(BlockPTQ.Options(epochs=4, train_codes=False)).estimate(ctx)
    assert a["memory_bytes"] > b["memory_bytes"] > 12_000 * 4                 # Adam moments of the codes
    assert b["seconds"] == pytest.approx(2 * a["seconds"])                   # twice the epochs
    assert a["seconds"] == pytest.approx(3 * 2 * 18 * 1.3 * 0.01)             # blocks x epochs x training samples


WIN = {"blockptq": {"epochs": 1, "windows": True, "window_epochs": 2, "lr_codes": 2e-2}}


def test_windows_pass_on_the_pivot_keeps_format_and_bits(tiny_models, tmp_path, capsys):
    """Phase 2 runs as a model stage after the layer-wise pass: every window of two adjacent
    blocks is trained and kept only if its held-out error falls; the checkpoint keeps its bits."""
    from onecomp_plugin_blockptq.windows import refine_windows   # noqa: F401  (public module)
    model = tiny_models("qwen3")
    rep = onecomp_core.quantize(model, tmp_path / "w", refiners=["blockptq"], options=WIN, **KW)
    stage = [r for r in rep["refine"] if r["name"] == "blockptq"]
    assert len(stage) == 1 and (stage[0]["after"] < stage[0]["before"]) == stage[0]["kept"]
    import re
    lines = re.findall(r"window 0-1: held-out (\S+) -> (\S+), (kept|rolled back)", capsys.readouterr().out)
    assert len(lines) == 1 and lines[0][0] != lines[0][1]            # the window trained
    assert (float(lines[0][1]) < float(lines[0][0])) == (lines[0][2] == "kept")
    a = onecomp_core.quantize(model, tmp_path / "p", refiners=["blockptq"], options={"blockptq": {"epochs": 1}}, **KW)
    assert rep["summary"]["bpw"] == a["summary"]["bpw"] and "refine" not in a or not a["refine"]
    m = onecomp_core.load_quantized(tmp_path / "w")
    with torch.no_grad():
        assert torch.isfinite(m(torch.randint(3, 300, (1, 8))).logits).all()


def _spec(name):
    from onecomp_core.sdk import LayerSpec
    return LayerSpec(name=name, format="uniform", projector="rtn", bits=KW["bits"], group_size=KW["group_size"],
                     symmetric=False)


def test_windows_roll_back_a_pair_that_gets_worse(tiny_llama):
    """With a learning rate that can only hurt, every window is rolled back: the views end
    exactly where they started."""
    from onecomp_core.sdk import attach_views, quantized_tensors
    from onecomp_plugin_blockptq.windows import capture, params_of, refine_windows
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as d:
        onecomp_core.quantize(tiny_llama, Path(d) / "q", **KW)
        student = onecomp_core.load_quantized(Path(d) / "q")
        teacher = __import__("transformers").AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
        qts = quantized_tensors(Path(d) / "q", load_plugins().registry)
    plan = {n: _spec(n) for n in qts}
    views = attach_views(student, qts, plan, {"uniform": UniformFormat()})
    before = [p.detach().clone() for p in params_of(views)]
    blocks_s, blocks_t = student.model.layers, teacher.model.layers
    bv = [{n[len(f"model.layers.{i}."):]: v for n, v in views.items() if n.startswith(f"model.layers.{i}.")}
          for i in range(len(blocks_s))]
    ids = torch.randint(3, 300, (4, 32))
    x_fp, kw = capture(teacher, blocks_t, ids, "cpu")
    x_q, _ = capture(student, blocks_s, ids, "cpu")
    recs = refine_windows(blocks_t, blocks_s, bv, x_fp, x_q, kw, epochs=2, batch=1, lr={"scales": 0.9, "codes": 9.0},
                          train={"codes": True}, beta=0.0, tau0=1.0, tau1=0.05, clip=0.0, heldout=0.25, seed=0)
    assert [r["window"] for r in recs] == [[0, 1]]
    for r in recs:
        assert (r["heldout_after"] < r["heldout_before"]) == r["kept"]
    if not recs[0]["kept"]:
        assert all(torch.equal(a, b) for a, b in zip(before, params_of(views)))


WINDOW_KILLER = textwrap.dedent("""
    import os, signal
    import onecomp_core
    import onecomp_plugin_blockptq.windows as W

    original = W.reconstruct
    calls = []

    def reconstruct_then_die(*a, **kw):
        out = original(*a, **kw)
        calls.append(1)
        if len(calls) == 2:                     # the second window trained, its state not saved
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    W.reconstruct = reconstruct_then_die
    onecomp_core.quantize({model!r}, {out!r}, refiners=["blockptq"], options={opts!r}, **{kw!r})
""")


@pytest.mark.whole_suite
def test_sigkill_during_the_windows_then_rerun_gives_the_same_bytes(tmp_path):
    from onecomp_core.testing import make_model
    model = make_model("qwen3", tmp_path / "four", layers=4)       # three windows
    out = tmp_path / "killed"
    kw = {**KW, "num_samples": 4}
    opts = {"blockptq": {"epochs": 1, "windows": True, "window_epochs": 1}}
    proc = subprocess.run([sys.executable, "-c", WINDOW_KILLER.format(model=str(model), out=str(out), kw=kw, opts=opts)],
                          capture_output=True, text=True, env={**os.environ, "ONECOMP_PROGRESS": "0"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (out / "onecomp.json").is_file()                       # the pivot is published
    carry = torch.load(tmp_path / "killed.onecomp-refine" / "refiner-blockptq" / "carry.pt", weights_only=True)
    assert carry["next"] == 1 and len(carry["records"]) == 1        # resumes at the second window
    onecomp_core.quantize(model, out, refiners=["blockptq"], options=opts, **kw)
    onecomp_core.quantize(model, tmp_path / "straight", refiners=["blockptq"], options=opts, **kw)
    for f in sorted(p.name for p in (tmp_path / "straight").glob("*.safetensors")):
        assert (out / f).read_bytes() == (tmp_path / "straight" / f).read_bytes(), f
