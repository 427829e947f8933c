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


@pytest.mark.parametrize("bits,group", [(4, 32), (3, 32), (4, -1), (4, 64)])
def test_transformers_loads_asymmetric_checkpoints_with_our_weights(tiny_llama, tmp_path, bits, group):
    """The default (asymmetric) grid under one scheme: plain from_pretrained reads our packed zero
    points; it dequantizes as it loads, in the scales' stored dtype, so its weights are ours
    rounded to that dtype, exactly, and its logits those of our model with such weights."""
    out = tmp_path / "q"
    onecomp_core.quantize(tiny_llama, out, **quick(bits=bits, group_size=group, symmetric=False))
    assert "tested with transformers 5.24" in (out / "README.md").read_text()
    ours = onecomp_core.load_quantized(out)
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    import json
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["dequantize"] is True and len(qc["config_groups"]) == 1      # group 64: 64 and 32 shared as 32
    scale_dtype = ours.get_submodule("model.layers.0.mlp.down_proj").scale.dtype
    stored = next(t for k, t in _stored_dtypes(out).items() if k.endswith("weight_scale"))
    with torch.no_grad():
        for name, m in ours.named_modules():
            if hasattr(m, "onecomp_quantized"):
                w = m(torch.eye(m.in_features, dtype=scale_dtype)).T
                assert torch.equal(w.to(stored).float(), theirs.get_submodule(name).weight.float()), name
                theirs.get_submodule(name).weight.copy_(w)       # our exact weights in their model
        ids = torch.randint(3, 384, (2, 30), generator=torch.Generator().manual_seed(1))
        a, b = ours(ids).logits, theirs(ids).logits
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())


def test_asymmetric_modules_of_one_width_share_a_disk_group():
    from onecomp_core.formats.uniform import common_disk_groups
    from onecomp_core.spec import LayerSpec
    shapes = {"a": (8, 576), "b": (8, 1536), "c": (8, 576)}
    specs = [LayerSpec("a", bits=4, group_size=128), LayerSpec("b", bits=4, group_size=128),
             LayerSpec("c", bits=3, group_size=128)]
    assert common_disk_groups(specs, shapes) == {"a": 64, "b": 64}       # 3-bit c alone: its own scheme
    assert common_disk_groups([LayerSpec(s.name, bits=4, group_size=128, symmetric=True) for s in specs], shapes) == {}
    assert common_disk_groups([LayerSpec("a", bits=4, group_size=48), LayerSpec("b", bits=4, group_size=48)],
                              {"a": (8, 64), "b": (8, 96)}) == {}       # a shared 16 would cost too much


def test_a_shared_disk_group_is_written_back_as_it_was_read(tiny_llama, tmp_path):
    """What a refiner's write-back goes through: tensors read from the checkpoint and written
    again by a format that read them give the stored bytes (the shared group kept)."""
    import json
    from safetensors.torch import load_file
    from onecomp_core.formats.uniform import UniformFormat
    out = tmp_path / "q"
    onecomp_core.quantize(tiny_llama, out, **quick(bits=4, group_size=64, symmetric=False))
    modules = json.loads((out / "onecomp.json").read_text())["modules"]
    stored = {}
    for f in out.glob("*.safetensors"):
        stored.update(load_file(str(f)))
    fmt = UniformFormat()
    for name, meta in modules.items():
        keys = {k: v for k, v in stored.items() if k.startswith(name + ".weight_")}
        again = fmt.to_tensors(name, fmt.from_tensors(name, keys, meta), stored[name + ".weight_scale"].dtype)
        assert again.keys() == keys.keys() and all(torch.equal(again[k], keys[k]) for k in keys), name
        assert keys[name + ".weight_scale"].shape[1] == int(meta["shape"][1]) // 32      # 64 and 32 shared as 32


def test_the_card_says_when_asymmetric_schemes_are_several(tiny_llama, tmp_path):
    out = tmp_path / "q"          # group 48: 16 on disk for the 64-wide inputs, 48 for the 96-wide
    onecomp_core.quantize(tiny_llama, out, **quick(bits=3, group_size=48, symmetric=False))
    assert "several schemes: transformers 5.24 decompresses every module with the first" in (out / "README.md").read_text()


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


def _stored_dtypes(folder):
    from onecomp_core.lazy_weights import LazyWeights
    w = LazyWeights(folder)
    return {k: w.dtype_of(k) for k in w.keys() if w.dtype_of(k).is_floating_point}


def test_unquantized_tensors_are_stored_in_16_bits_unless_asked(tiny_llama, tmp_path):
    """A float32 source gives float16 embeddings, norms and scales (float32 on request, bfloat16
    for a tensor float16 cannot hold); the logits are those of the source's tensors rounded to
    float16, transformers reads the same, and the report gives the sizes."""
    import json
    import shutil
    from safetensors.torch import load_file, save_file
    src = tmp_path / "src"
    shutil.copytree(tiny_llama, src)
    f = next(src.glob("*.safetensors"))
    t = load_file(str(f))
    t["model.norm.weight"][0] = 1e5                      # beyond float16's range
    save_file(t, str(f), metadata={"format": "pt"})
    for store, want in [("auto", torch.float16), ("float32", torch.float32)]:
        out = tmp_path / store
        onecomp_core.quantize(src, out, **quick(bits=4, group_size=32, symmetric=True, store_dtype=store))
        dt = _stored_dtypes(out)
        assert dt.pop("model.norm.weight") == (torch.bfloat16 if store == "auto" else torch.float32)
        assert set(dt.values()) == {want}, set(dt.values())
        s = json.loads((out / "report.json").read_text())["summary"]
        assert s["source_mb"] > s["checkpoint_mb"] > 0 and s["size_ratio"] == pytest.approx(
            sum(p.stat().st_size for p in out.glob("*.safetensors")) / f.stat().st_size, rel=1e-3)
        ours = onecomp_core.load_quantized(out)
        theirs = AutoModelForCausalLM.from_pretrained(out).eval()
        ids = torch.randint(3, 384, (2, 30), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=1e-5)
        emb = ours.get_input_embeddings().weight
        assert emb.dtype == torch.float32 and torch.equal(emb, t["model.embed_tokens.weight"].to(want).float())
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "auto").glob("*.safetensors")}
    assert sizes["model-outer.safetensors"] < 0.6 * (tmp_path / "float32" / "model-outer.safetensors").stat().st_size
