"""An output folder loaded back as a runnable model (its layout: :mod:`onecomp_core.export`)."""
from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cache
from pathlib import Path

from .errors import OnecompError

META = "onecomp.json"


def read_meta(folder: Path) -> dict:
    p = Path(folder) / META
    if not Path(folder).is_dir():
        raise OnecompError(f"checkpoint folder {folder} does not exist")
    if not p.is_file():
        raise OnecompError(f"{folder} is not an onecomp checkpoint (no {META}); quantize a model first")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise OnecompError(f"{p} is not valid JSON: the checkpoint is damaged; quantize the model again") from None


def load_quantized(folder, device: str = "auto", dtype: str = "auto", plugins=None):
    """A runnable transformers model from an onecomp output folder, whatever its format."""
    from .plugins import load_plugins
    from .resources import release_memory
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
    tied = getattr(sk.config, "tie_word_embeddings", False) and "lm_head" not in meta["modules"]
    head = next((n for n, m in sk.model.named_modules() if m is sk.model.get_output_embeddings()), None)
    sk.fill(sk.model, "", skip=(head,) if tied and head else ())    # a tied head is not read twice
    if tied:
        sk.model.tie_weights()
    sk.model.to(sk.dtype).eval()
    release_memory()                 # the heap pages of what loading unpacked and dropped
    return sk.model


def _module_keys(sk, name: str):
    return module_keys(sk.weights.keys(), name)


def module_keys(keys, name: str) -> list[str]:
    """The stored tensors of quantized module ``name`` (its bias excluded)."""
    pre = name + "."
    return [k for k in keys if k.startswith(pre) and "." not in k[len(pre):] and k != pre + "bias"]


def quantized_tensors(folder, registry) -> dict:
    """{module name: its stored quantized tensor} of an onecomp checkpoint, read through the
    formats' ``from_tensors`` (what a refiner builds trainable views from)."""
    return dict(stored_modules(folder, registry))


class StoredModules(Mapping):
    """{module name: its stored quantized tensor}, each rebuilt by its format's ``from_tensors``
    when asked, so a pass over the blocks holds one block's at a time (a DBF model's unpacked
    signs are ~4 bytes per sign). ``tensors_of(name)``: that module's stored tensors by key;
    ``format_of(format name)``: the format instance."""

    def __init__(self, modules: dict, tensors_of, format_of):
        self.modules, self.tensors_of, self.format_of = modules, tensors_of, format_of

    def __getitem__(self, name):
        m = self.modules[name]
        return self.format_of(m["format"]).from_tensors(name, self.tensors_of(name), m)

    def shape(self, name) -> tuple:
        """(out, in) of module ``name``, from the checkpoint's metadata (nothing read)."""
        return tuple(self.modules[name]["shape"])

    def __iter__(self):
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)


def stored_modules(folder, registry) -> StoredModules:
    """The quantized modules of the onecomp checkpoint at ``folder``, read when asked."""
    from .lazy_weights import LazyWeights
    meta = read_meta(Path(folder))
    weights = LazyWeights(Path(folder))
    keys = list(weights.keys())
    return StoredModules(meta["modules"], lambda name: {k: weights.get(k) for k in module_keys(keys, name)},
                         cache(lambda f: registry.get("format", f)()))
