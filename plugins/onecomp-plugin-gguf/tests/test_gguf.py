"""The gguf exporter: exact ggml blocks from onecomp's codes, read back by gguf-py and by
transformers' GGUF loader; impossible settings refused before any work."""
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import onecomp_core
from onecomp_core.testing import cli, quick
from onecomp_plugin_gguf.blocks import encode, gguf_type
from onecomp_plugin_gguf.plugin import permute_rows


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([("Q4_0", 4), ("Q4_1", 4), ("Q8_0", 8), ("Q4_0", 3), ("Q4_0", 2), ("Q4_1", 3), ("Q4_1", 2),
                        ("Q8_0", 5), ("Q8_0", 6)]), st.integers(1, 4), st.integers(1, 4),
       st.sampled_from([32, 64, 128, -1]), st.integers(0, 2**31 - 1))
def test_blocks_hold_the_grid_exactly(kind_bits, rows, nblocks, group, seed):
    """Codes and 16-bit scales in, ggml's own dequantization out = onecomp's s (q - z), up to the
    float16 rounding of Q4_1's offset m = -s z; a grid of fewer bits in a wider type as well."""
    kind, bits = kind_bits
    g = torch.Generator().manual_seed(seed)
    cols = 32 * nblocks * (1 if group == -1 else max(1, group // 32))
    groups = 1 if group == -1 else -(-cols // group)
    codes = torch.randint(0, 2**bits, (rows, cols), generator=g, dtype=torch.uint8)
    scale = (torch.rand(rows, groups, generator=g) * 0.1 + 1e-3).half().float()
    zero = (torch.randint(0, 2**bits, (rows, groups), generator=g).float() if kind == "Q4_1"
            else torch.full((rows, groups), 2.0 ** (bits - 1)))
    assert gguf_type(bits, kind != "Q4_1", group, wider=True) == kind
    raw = encode(codes, scale, zero, group, kind)
    import gguf
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    assert raw.dtype == np.uint8 and raw.shape == (rows, cols // block * size)
    g_of = torch.arange(cols) // (cols if group == -1 else group)          # onecomp's grid: s (q - z) per group
    want = scale[:, g_of] * (codes.float() - zero[:, g_of])
    theirs = torch.from_numpy(gguf.quants.dequantize(raw, qtype)).float().reshape(rows, cols)
    tol = 0.0 if kind != "Q4_1" else float((scale * zero).abs().max()) * 2**-10
    assert float((theirs - want).abs().max()) <= tol


def test_which_grids_have_an_exact_type():
    assert gguf_type(4, False, 128) == "Q4_1" and gguf_type(4, True, 32) == "Q4_0"
    assert gguf_type(8, True, -1) == "Q8_0"
    assert gguf_type(3, False, 128) is None and gguf_type(4, False, 48) is None and gguf_type(8, False, 64) is None
    assert gguf_type(3, False, 128, wider=True) == "Q4_1" and gguf_type(2, True, 64, wider=True) == "Q4_0"
    assert gguf_type(6, True, -1, wider=True) == "Q8_0" and gguf_type(6, False, 64, wider=True) is None
    assert gguf_type(3, False, 48, wider=True) is None


def test_permutation_is_llama_cpps():
    w = torch.arange(24.0).reshape(8, 3)
    ref = w.reshape(2, 2, 2, 3).swapaxes(1, 2).reshape(8, 3)       # llama.cpp's converter, written out
    assert torch.equal(w[permute_rows(8, 2)], ref)


@pytest.mark.parametrize("symmetric,bits,group", [(False, 4, 32), (True, 4, 64), (True, 8, -1)])
def test_transformers_reads_the_gguf_as_onecomp_loads_the_checkpoint(tiny_llama, tmp_path, symmetric, bits, group):
    import gguf
    from transformers import AutoModelForCausalLM
    out = tmp_path / "q"
    onecomp_core.quantize(tiny_llama, out, exports=["gguf"],
                          **quick(bits=bits, group_size=group, symmetric=symmetric))
    reader = gguf.GGUFReader(str(out / "model.gguf"))
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    want = {(4, False): "Q4_1", (4, True): "Q4_0", (8, True): "Q8_0"}[(bits, symmetric)]
    assert kinds["blk.0.attn_q.weight"] == kinds["blk.1.ffn_down.weight"] == want
    assert kinds["token_embd.weight"] == "F16" and kinds["blk.0.attn_norm.weight"] == "F32"
    ours = onecomp_core.load_quantized(out)
    theirs = AutoModelForCausalLM.from_pretrained(str(out), gguf_file="model.gguf", dtype=torch.float32).eval()
    td, checked = theirs.state_dict(), 0
    for name, mod in ours.named_modules():      # every weight as onecomp dequantizes it (float16 outer tensors)
        w = mod.weight_dequantized() if hasattr(mod, "weight_dequantized") else getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and name + ".weight" in td:
            d = float((w.detach().float() - td[name + ".weight"].float()).abs().max())
            # Q4_1's offset m = -s z is float16: half an ulp of |m| <= 16 max s
            tol = 0.0 if symmetric or not hasattr(mod, "weight_dequantized") else float(mod.scale.detach().max()) * 16 * 2**-11
            assert d <= tol, (name, d)
            checked += 1
    assert checked == 2 * 9 + 3                 # 7 linears + 2 norms per block, embedding, norm, head
    ids = torch.randint(3, 384, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    assert torch.allclose(a, b, atol=1e-4 if symmetric else 1e-2), float((a - b).abs().max())
    tok = reader.fields["tokenizer.ggml.tokens"]
    assert len(tok.data) == 384


def test_impossible_settings_fail_before_any_work(tiny_llama, tmp_path, capsys):
    for flags, msg in [(["--bits", "3"], "3-bit asymmetric group 32"), (["--group-size", "48"], "group 48"),
                       (["--bits", "8"], "8-bit asymmetric")]:
        rc = cli(["quantize", str(tiny_llama), "--out", str(tmp_path / "q"), "--export", "gguf",
                  "--calibration", str(tmp_path / "missing.txt"), "--group-size", "32", "--projector", "rtn", *flags])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and msg in err and "--export gguf" in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "q").exists()


def _model_256(folder):
    """A tiny Llama whose linears' inputs are whole K-quant super-blocks (256, 512)."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    from onecomp_core.testing import COMMON, tokenizer
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**COMMON, "hidden_size": 256, "intermediate_size": 512})
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tokenizer(folder)
    return folder


@pytest.mark.parametrize("bits, kind", [(3, "Q3_K"), (2, "Q2_K")])
def test_requantize_writes_k_quants_and_reports_each_modules_error(tmp_path, bits, kind):
    import gguf
    from transformers import AutoModelForCausalLM
    model = _model_256(tmp_path / "m")
    out = tmp_path / "q"
    rep = onecomp_core.quantize(model, out, exports=["gguf"], options={"gguf.requantize": True},
                                **quick(bits=bits, group_size=64))
    assert rep["exports"]["gguf"] == ["model.gguf", "gguf_requantize.json"]
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out / "model.gguf")).tensors}
    assert kinds["blk.0.attn_q.weight"] == kinds["blk.1.ffn_down.weight"] == kind
    errs = json.loads((out / "gguf_requantize.json").read_text())
    assert len(errs) == len(rep["layers"]) and all(e["type"] == kind for e in errs.values())
    assert all(0 < e["rel_error"] < 0.5 for e in errs.values())
    ours = onecomp_core.load_quantized(out)
    theirs = AutoModelForCausalLM.from_pretrained(str(out), gguf_file="model.gguf", dtype=torch.float32).eval()
    w = ours.model.layers[0].mlp.down_proj.weight_dequantized().detach().float()
    t = theirs.model.layers[0].mlp.down_proj.weight.detach().float()
    name = "model.layers.0.mlp.down_proj"
    assert abs(float((t - w).norm() / w.norm()) - errs[name]["rel_error"]) < 1e-3   # the error it reports


def test_requantize_without_whole_super_blocks_uses_the_wider_exact_type(tiny_llama, tmp_path):
    import gguf
    out = tmp_path / "q"
    onecomp_core.quantize(tiny_llama, out, exports=["gguf"], options={"gguf.requantize": True},
                          **quick(bits=3, group_size=32))
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out / "model.gguf")).tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q4_1"                  # 64 inputs: no K-quant; 3 bits sit in Q4_1
    errs = json.loads((out / "gguf_requantize.json").read_text())
    assert all(e["type"] == "Q4_1" and e["rel_error"] < 1e-3 for e in errs.values())     # exact up to float16 m


def _same_logits_in_transformers(out):
    """transformers' GGUF loader gives onecomp's logits (1e-4) for the checkpoint in ``out``."""
    from transformers import AutoModelForCausalLM
    ours = onecomp_core.load_quantized(out)
    theirs = AutoModelForCausalLM.from_pretrained(str(out), gguf_file="model.gguf", dtype=torch.float32).eval()
    ids = torch.randint(3, 384, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())


def _qwen3_head_128(folder):
    """A tiny Qwen3 with head_dim 128: transformers' GGUF loader ignores attention.key_length for
    qwen3 and assumes 128 (llama.cpp reads it)."""
    from transformers import AutoModelForCausalLM, Qwen3Config
    from onecomp_core.testing import COMMON, tokenizer
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(Qwen3Config(**COMMON, head_dim=128)).save_pretrained(folder)
    tokenizer(folder)
    return folder


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3"])
def test_other_architectures_read_back_by_transformers_gguf_loader(arch, tiny_models, tmp_path):
    out = tmp_path / "q"
    src = _qwen3_head_128(tmp_path / "m") if arch == "qwen3" else tiny_models(arch)
    onecomp_core.quantize(src, out, exports=["gguf"], **quick(bits=4, group_size=32, symmetric=True))
    _same_logits_in_transformers(out)


def test_a_mixed_plan_within_exact_types_exports_as_mixed_type_gguf(tiny_llama, tmp_path):
    """A planner giving down_proj 8 bits and the rest 4 (symmetric): Q8_0 and Q4_0 in one file,
    read back by transformers' GGUF loader with onecomp's logits."""
    import gguf
    from onecomp_core.sdk import LayerSpec, Plan, Planner, hookimpl

    class EightBitDown(Planner):
        name = "eightbit-down-gguf"

        def plan(self, ctx):
            r = ctx.run
            return Plan({n: LayerSpec(name=n, format=r.format, projector=r.projector,
                                      bits=8 if n.endswith("down_proj") else r.bits, group_size=r.group_size,
                                      symmetric=r.symmetric) for n in ctx.shapes}, planner=self.name)

    class P:
        @hookimpl
        def onecomp_register_planners(self, registry):
            registry.add_planner(EightBitDown)
    out = tmp_path / "q"
    onecomp_core.quantize(tiny_llama, out, plugins=[P()], planner="eightbit-down-gguf", exports=["gguf"],
                          **quick(bits=4, group_size=32, symmetric=True))
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out / "model.gguf")).tensors}
    assert kinds["blk.0.ffn_down.weight"] == "Q8_0" and kinds["blk.0.attn_q.weight"] == "Q4_0"
    _same_logits_in_transformers(out)


def _tokenizer_json(folder, pre):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps({"pre_tokenizer": pre, "model": {"type": "BPE"}}))
    return folder


def test_pre_tokenizer_name_is_read_off_tokenizer_json(tmp_path):
    from onecomp_plugin_gguf.metadata import SPLIT_PATTERNS, pre_tokenizer
    byte = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert pre_tokenizer(_tokenizer_json(tmp_path / "a", byte)) == "gpt-2"
    digits = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte]}
    assert pre_tokenizer(_tokenizer_json(tmp_path / "b", digits)) == "smollm"
    for name, pattern in SPLIT_PATTERNS.items():
        split = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            {**byte, "use_regex": False}]}
        assert pre_tokenizer(_tokenizer_json(tmp_path / name, split)) == name
    odd = {"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": "x"}}, {**byte, "use_regex": False}]}
    assert pre_tokenizer(_tokenizer_json(tmp_path / "c", odd)) is None
    assert pre_tokenizer(_tokenizer_json(tmp_path / "d", {"type": "Whitespace"})) is None
    assert pre_tokenizer(tmp_path / "no-json") == "gpt-2"          # vocab.json + merges.txt


def test_the_written_pre_tokenizer_and_the_note_for_an_unknown_one(tiny_llama, tmp_path, capsys):
    import shutil
    from gguf import GGUFReader
    from onecomp_plugin_gguf.metadata import pre_tokenizer

    def written(out):
        return bytes(GGUFReader(str(out / "model.gguf")).fields["tokenizer.ggml.pre"].parts[-1]).decode()

    onecomp_core.quantize(tiny_llama, tmp_path / "auto", bits=4, group_size=32, projector="rtn", exports=["gguf"])
    assert written(tmp_path / "auto") == pre_tokenizer(tiny_llama) == "gpt-2"
    assert "pre-tokenizer" not in capsys.readouterr().err
    onecomp_core.quantize(tiny_llama, tmp_path / "asked", bits=4, group_size=32, projector="rtn", exports=["gguf"],
                          options={"gguf": {"tokenizer_pre": "smollm"}})
    assert written(tmp_path / "asked") == "smollm"
    odd = tmp_path / "odd-model"
    shutil.copytree(tiny_llama, odd)
    tok = json.loads((odd / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": "x"},
                            "behavior": "Isolated", "invert": False},
                           {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    (odd / "tokenizer.json").write_text(json.dumps(tok))
    onecomp_core.quantize(odd, tmp_path / "odd", bits=4, group_size=32, projector="rtn", exports=["gguf"])
    err = capsys.readouterr().err
    assert "--option gguf.tokenizer_pre=NAME" in err and written(tmp_path / "odd") == "default"
