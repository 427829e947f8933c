"""The output folder: assembled from the committed blocks, and loaded back as a runnable model.

Layout: ``config.json`` (with compressed-tensors' ``quantization_config`` when every quantized
module's format has one), tokenizer files, safetensors shards (one per block plus the outer
tensors) with ``model.safetensors.index.json``, ``onecomp.json`` (per-module format metadata),
``report.json`` and ``report.md``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .errors import OnecompError
from .store import atomic_json, atomic_save_tensors

META = "onecomp.json"
COPY = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
        "generation_config.json", "vocab.json", "merges.txt", "chat_template.jinja", "added_tokens.json")


def assemble(sk, store, plan, formats, meta_extra: dict) -> Path:
    final = store.work / "final"
    if final.exists():
        shutil.rmtree(final)
    final.mkdir()
    weight_map = {}
    for i in range(len(sk.blocks)):
        src = store.block_file(i)
        name = f"model-block-{i:05d}.safetensors"
        shutil.copyfile(src, final / name)
        from safetensors import safe_open
        with safe_open(str(src), "pt") as f:
            for k in f.keys():
                weight_map[k] = name
    outer = {}
    for mod_name, mod in sk.outer_modules():
        for pname, _ in mod.state_dict().items():
            key = f"{mod_name}.{pname}"
            if key.endswith("lm_head.weight") and getattr(sk.config, "tie_word_embeddings", False):
                continue
            outer[key] = sk._read(key)
    atomic_save_tensors(final / "model-outer.safetensors", outer, metadata={"format": "pt"})
    weight_map.update({k: "model-outer.safetensors" for k in outer})
    atomic_json(final / "model.safetensors.index.json", {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))})

    shapes = sk.linear_shapes()
    modules = {n: {**s.to_dict(), "shape": list(shapes[n])} for n, s in plan.specs.items()}
    config = sk.config_dict()
    config.pop("quantization_config", None)
    fmt_names = {m["format"] for m in modules.values()}
    if len(fmt_names) == 1:
        (fname,) = fmt_names
        qc = formats[fname].checkpoint_config(modules)
        if qc is not None:
            config["quantization_config"] = qc
    atomic_json(final / "config.json", config)
    atomic_json(final / META, {"modules": modules, **meta_extra})
    for f in COPY:
        if (sk.folder / f).is_file():
            shutil.copyfile(sk.folder / f, final / f)
    return final


def read_meta(folder: Path) -> dict:
    p = Path(folder) / META
    if not p.is_file():
        raise OnecompError(f"{folder} is not an onecomp checkpoint (no {META}); quantize a model first")
    return json.loads(p.read_text())


def load_quantized(folder, device: str = "auto", dtype: str = "auto", plugins=None):
    """A runnable transformers model from an onecomp output folder, whatever its format."""
    from .plugins import load_plugins
    from .skeleton import Skeleton, pick_device
    folder = Path(folder)
    if not folder.is_dir():
        raise OnecompError(f"checkpoint folder {folder} does not exist")
    meta = read_meta(folder)
    ps = plugins or load_plugins()
    sk = Skeleton(folder, ps.registry, pick_device(device), dtype)
    formats = {}
    for name, m in meta["modules"].items():
        fname = m["format"]
        if fname not in formats:
            formats[fname] = ps.registry.get("format", fname)()
        parent_name, _, child = name.rpartition(".")
        parent = sk.model.get_submodule(parent_name)
        prefix_keys = [k for k in _module_keys(sk, name)]
        tensors = {k: sk.weights.get(k) for k in prefix_keys}
        qt = formats[fname].from_tensors(name, tensors, m)
        bias_key = f"{name}.bias"
        bias = sk.weights.get(bias_key) if bias_key in sk.weights else None
        mod = formats[fname].module(qt, bias).to(sk.device)
        setattr(parent, child, mod)
    sk.fill(sk.model, "")
    if getattr(sk.config, "tie_word_embeddings", False) and "lm_head" not in meta["modules"]:
        sk.model.tie_weights()
    sk.model.to(sk.dtype).eval()
    return sk.model


def _module_keys(sk, name: str):
    pre = name + "."
    return [k for k in sk.weights.keys() if k.startswith(pre) and "." not in k[len(pre):] and k != pre + "bias"]
