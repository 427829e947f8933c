"""Block refiners through the BlockContext: hooks before each group and after the block, FP
weights restored with every other linear quantized, re-quantization, roll-back."""
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import onecomp_core
from onecomp_core.sdk import BlockRefiner, Correction, hookimpl


def plugin(*classes):
    class P:
        @hookimpl
        def onecomp_register_refiners(self, registry):
            for c in classes:
                registry.add_refiner(c)
    return P()


KW = dict(bits=3, group_size=32, projector="rtn", num_samples=2, seq_len=32)


class Probe(BlockRefiner):
    """Records what it is shown, then redoes every group once from FP (a second pass)."""
    name = "probe"
    needs_fp_weights = True
    seen: list = []

    def before_group(self, bctx, group):
        type(self).seen.append(("before", bctx.prefix, tuple(group), frozenset(bctx.quantized)))

    def refine_block(self, bctx):
        everything = set(bctx.linears)
        for group in bctx.groups:
            bctx.restore_fp(group)
            w = [bctx.module(n).weight.detach().clone() for n in group]
            type(self).seen.append(("redo", bctx.prefix, tuple(group), frozenset(bctx.quantized - set(group)),
                                    bctx.residual_writers, w))
            assert bctx.quantized >= everything
            bctx.quantize_group(group, pass_index=1)


def test_hooks_see_groups_in_order_and_fp_weights_come_back(tiny_llama, tmp_path):
    fp = AutoModelForCausalLM.from_pretrained(tiny_llama)
    Probe.seen = []
    rep = onecomp_core.quantize(tiny_llama, tmp_path / "q", plugins=[plugin(Probe)], refiners=["probe"], **KW)
    before = [s for s in Probe.seen if s[0] == "before" and s[1] == "model.layers.0"]
    groups = [s[2] for s in before]
    assert groups == [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                      ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)]
    done = set()
    for _, _, group, quantized in before:                     # each group sees exactly the earlier ones quantized
        assert quantized == done
        done |= set(group)
    redo = [s for s in Probe.seen if s[0] == "redo" and s[1] == "model.layers.0"]
    assert [s[2] for s in redo] == groups
    for _, prefix, group, others, writers, weights in redo:
        assert others == done - set(group)                     # every other linear quantized
        assert writers == {"self_attn.o_proj", "mlp.down_proj"}
        for n, w in zip(group, weights):                       # restored to full precision
            assert torch.equal(w, fp.get_submodule(f"{prefix}.{n}").weight)
    assert all(li["pass"] == 2 for li in rep["layers"].values())


class Saboteur(Correction):
    """In a redo (pass_index > 0) aims every projector at a ruined target."""
    name = "saboteur"

    def adjust_target(self, ctx):
        return ctx.target * (10.0 if ctx.pass_index > 0 else 1.0)


class Guarded(BlockRefiner):
    """Redo each group; keep it only if the block's output error does not rise."""
    name = "guarded"
    needs_fp_weights = True

    def refine_block(self, bctx):
        err = bctx.error()
        for group in bctx.groups:
            snap = bctx.snapshot(group)
            bctx.restore_fp(group)
            bctx.quantize_group(group, pass_index=1)
            after = bctx.error()
            if after > err:
                bctx.restore(snap)
            else:
                err = after


def test_a_redo_that_raises_the_block_error_is_rolled_back(tiny_llama, tmp_path):
    plugins = [plugin(Saboteur, Guarded)]
    kw = {**KW, "forward_dtype": "off"}        # the streams in one precision with and without a block refiner
    ref = onecomp_core.quantize(tiny_llama, tmp_path / "ref", plugins=plugins, refiners=["saboteur"], **kw)
    bad = onecomp_core.quantize(tiny_llama, tmp_path / "bad", plugins=plugins, refiners=["saboteur", "guarded"], **kw)
    assert all(li.get("pass_rejected") and li["pass"] == 1 for li in bad["layers"].values())
    assert {n: li["rel_error"] for n, li in bad["layers"].items()} == {n: li["rel_error"] for n, li in ref["layers"].items()}
    for b in ("00000", "00001"):
        x, y = (load_file(str(tmp_path / d / f"model-block-{b}.safetensors")) for d in ("ref", "bad"))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_block_error_is_zero_before_any_quantization_and_grows_after(tiny_llama, tmp_path):
    seen = {}

    class Measure(BlockRefiner):
        name = "measure"

        def before_group(self, bctx, group):
            if not bctx.quantized:
                seen.setdefault(bctx.index, []).append(bctx.error())

        def refine_block(self, bctx):
            seen[bctx.index].append(bctx.error())
    onecomp_core.quantize(tiny_llama, tmp_path / "q", plugins=[plugin(Measure)], refiners=["measure"], **KW)
    assert seen[0][0] == 0.0 and seen[0][1] > 0            # block 0: same stream, FP block = its own target
    assert seen[1][0] > 0                                  # block 1: the quantized stream has drifted


def test_rtn_runs_no_block_on_calibration_data_and_writes_the_same_blocks(tiny_llama, tmp_path, monkeypatch):
    class Idle(BlockRefiner):                              # any block refiner needs the streams
        name = "idle"

        def refine_block(self, bctx):
            pass
    with_data = onecomp_core.quantize(tiny_llama, tmp_path / "d", plugins=[plugin(Idle)], refiners=["idle"], **KW)
    assert with_data["summary"]["calibration_forwards"] is True

    def no_forward(*a, **k):
        raise AssertionError("a block ran on calibration data")
    monkeypatch.setattr("onecomp_core.block_pass.run_block", no_forward)
    monkeypatch.setattr("onecomp_core.gather.run_block", no_forward)
    free = onecomp_core.quantize(tiny_llama, tmp_path / "f", **KW)
    assert free["summary"]["calibration_forwards"] is False
    assert {n: li["rel_error"] for n, li in free["layers"].items()} == \
        {n: li["rel_error"] for n, li in with_data["layers"].items()}
    for b in ("00000", "00001"):
        x, y = (load_file(str(tmp_path / d / f"model-block-{b}.safetensors")) for d in ("d", "f"))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_streams_on_disk_give_the_same_bytes_as_streams_in_memory(tiny_llama, tmp_path):
    kw = dict(KW, projector="gptq", bits=3, num_samples=3)
    mem = onecomp_core.quantize(tiny_llama, tmp_path / "m", spill_streams="never", **kw)
    disk = onecomp_core.quantize(tiny_llama, tmp_path / "d", spill_streams="always", **kw)
    assert disk["summary"]["streams_on_disk"] is True and mem["summary"]["streams_on_disk"] is False
    assert {n: li["rel_error"] for n, li in mem["layers"].items()} == {n: li["rel_error"] for n, li in disk["layers"].items()}
    for b in ("00000", "00001"):
        x, y = (load_file(str(tmp_path / d / f"model-block-{b}.safetensors")) for d in ("m", "d"))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert not list((tmp_path / "d").rglob("spill"))                    # the stream files are gone
    roomy = onecomp_core.quantize(tiny_llama, tmp_path / "a", max_memory="64GiB", **kw)
    assert roomy["summary"]["streams_on_disk"] is False                # auto: they fit


def test_the_fp_stream_runs_only_where_something_reads_it(tiny_llama, tmp_path, monkeypatch):
    """GPTQ alone reads the quantized stream only: one full block forward per block (plus the
    statistics' early-stopped ones); QEP's cross statistics need the FP stream too."""
    import onecomp_core.block_pass as bp
    calls = []
    real = bp.run_block
    monkeypatch.setattr(bp, "run_block", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = {**KW, "projector": "gptq"}
    plain = onecomp_core.quantize(tiny_llama, tmp_path / "g", **kw)
    blocks = len({n.split(".")[2] for n in plain["layers"]})                 # model.layers.N.*
    assert len(calls) == blocks
    calls.clear()
    onecomp_core.quantize(tiny_llama, tmp_path / "qep", refiners=["qep"], **kw)
    assert len(calls) == 2 * blocks


def test_forward_dtype_changes_only_the_forwards_and_is_reported(tiny_llama, tmp_path):
    """GPTQ with the pass's forwards autocast to bfloat16 (statistics only, or streams too) and
    without: the report names what ran, the layers' summed relative error stays within 2% of the
    float32 run's and every layer's within 25% (the clipping search picks one of 80 ranges per
    row from a 128-token Hessian, so a single layer may flip to a neighbouring range; measured:
    at most 17% on one layer, 0.02% summed), and the stored bits are the same."""
    kw = dict(bits=4, group_size=32, projector="gptq", num_samples=4, seq_len=32)
    reps = {fd: onecomp_core.quantize(tiny_llama, tmp_path / fd, forward_dtype=fd, **kw)
            for fd in ("off", "statistics", "bfloat16")}
    f32, bf16 = "float32", "bfloat16"
    assert {fd: r["summary"]["forward_dtype"] for fd, r in reps.items()} == {
        "off": {"statistics": f32, "streams": f32}, "statistics": {"statistics": bf16, "streams": f32},
        "bfloat16": {"statistics": bf16, "streams": bf16}}
    ref = reps["off"]["layers"]
    for fd in ("statistics", "bfloat16"):
        got = reps[fd]["layers"]
        assert got.keys() == ref.keys() and reps[fd]["summary"]["bpw"] == reps["off"]["summary"]["bpw"]
        for n in ref:
            assert abs(got[n]["rel_error"] - ref[n]["rel_error"]) <= 0.25 * ref[n]["rel_error"], (fd, n)
        total, total_ref = (sum(r[n]["rel_error"] for n in ref) for r in (got, ref))
        assert abs(total - total_ref) <= 0.02 * total_ref, fd


@pytest.mark.parametrize("arch,correction,forward_dtype", [
    (a, c, "off") for a in ("llama", "qwen3", "gemma2", "phi3", "mixtral") for c in ([], ["qep"])]
    + [("llama", [], "bfloat16"), ("llama", ["qep"], "bfloat16")])
def test_replaying_the_settled_attention_gives_the_same_bytes_with_fewer_forwards(arch, correction, forward_dtype,
                                                                                 tiny_models, tmp_path, monkeypatch):
    """Once q/k/v/o are quantized the attention's output is recorded once and replayed, and once
    q/k/v are, o_proj's input: the checkpoint is byte-identical to recomputing them every time,
    and fewer linears run with each (under GPTQ the attention core runs once per block, plus one
    batch to check against, instead of four times)."""
    from onecomp_core.adapters.decoder import DecoderAdapter
    kw = dict(bits=3, group_size=16, projector="gptq", refiners=correction, num_samples=5, seq_len=16,
              batch_size=2, forward_dtype=forward_dtype)
    calls = {"n": 0}
    real = torch.nn.Module.__call__

    def counting(self, *a, **k):
        if isinstance(self, torch.nn.Linear):             # the replayed attention's linears do not run
            calls["n"] += 1
        return real(self, *a, **k)
    monkeypatch.setattr(torch.nn.Module, "__call__", counting)
    counts = {}
    for mode in ("projection", "replay", "plain"):
        if mode == "replay":
            monkeypatch.setattr(DecoderAdapter, "output_projection", lambda self, block, name: None)
        if mode == "plain":
            monkeypatch.setattr(DecoderAdapter, "replayable", lambda self, block: [])
        calls["n"] = 0
        onecomp_core.quantize(tiny_models(arch), tmp_path / mode, **kw)
        counts[mode] = calls["n"]
    for f in ("model-block-00000.safetensors", "model-block-00001.safetensors"):
        a, b, c = (load_file(str(tmp_path / m / f)) for m in ("projection", "replay", "plain"))
        assert a.keys() == b.keys() == c.keys(), (arch, f)
        assert all(torch.equal(a[k], c[k]) and torch.equal(b[k], c[k]) for k in a), (arch, f)
    assert counts["replay"] < counts["plain"], counts
    if arch == "gemma2":    # eager attention returns its weights (a tensor per batch): o_proj's input is not
        assert counts["projection"] == counts["replay"] + 2, counts      # replayed; one o_proj per block checked it
    else:
        assert counts["projection"] < counts["replay"], counts


def test_auto_keeps_every_forward_in_float32_when_a_block_refiner_runs(tiny_llama, tmp_path):
    """forward_dtype auto: block refiners (LPCD, blockptq) train on the streams and were measured
    to suffer from bfloat16 routing on MoE models, so nothing autocasts when one runs."""
    rep = onecomp_core.quantize(tiny_llama, tmp_path / "q", plugins=[plugin(Guarded)], refiners=["guarded"], **KW)
    assert rep["summary"]["forward_dtype"] == {"statistics": "float32", "streams": "float32"}
