"""Content digests for the keys of on-disk caches and for resume fingerprints: what a cached
result depends on is hashed by its bytes, never by name, size or modification time alone."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

_MEMO: dict[tuple, str] = {}    # (path, size, mtime_ns, inode) -> digest, within one process


def file_digest(path) -> str:
    """SHA-256 of a file's bytes (hashed once per process while the file is unchanged)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _MEMO:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 23), b""):
                h.update(chunk)
        _MEMO[key] = h.hexdigest()
    return _MEMO[key]


def files_digest(paths) -> str:
    """One digest of several files' names and bytes (a folder: every file under it)."""
    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            h.update(f"{f.relative_to(p) if p.is_dir() else f.name}\0{file_digest(f)}\0".encode())
    return h.hexdigest()


def weights_digest(folder) -> str:
    """A model folder's weights and config by content (its *.safetensors and config.json)."""
    folder = Path(folder)
    return files_digest(sorted(folder.glob("*.safetensors")) + [f for f in [folder / "config.json"] if f.is_file()])


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and values."""
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """A tokenizer by what it does: its serialized fast tokenizer (vocabulary, merges, normalizer,
    pre- and post-processing), or its vocabulary where it has no fast backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}\0{text}".encode()).hexdigest()


def clear_memo() -> None:
    _MEMO.clear()


__all__ = ["file_digest", "files_digest", "weights_digest", "tensor_digest", "tokenizer_digest"]
