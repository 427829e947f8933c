"""Model resolution: the GGUF conversion cache is keyed by content, and bad paths fail in one line."""
from __future__ import annotations

import os

import pytest

from onecomp_core.errors import OnecompError
from onecomp_core.model_source import gguf_cache_dir, resolve_model


def test_gguf_cache_is_keyed_by_content_not_path(tmp_path, monkeypatch):
    monkeypatch.setenv("ONECOMP_CACHE", str(tmp_path / "cache"))
    a, b, c = (tmp_path / d for d in ("a", "b", "c"))
    for d, payload in ((a, b"GGUF same bytes"), (b, b"GGUF same bytes"), (c, b"GGUF other bytes")):
        d.mkdir()
        (d / "m.gguf").write_bytes(payload)
    os.utime(b / "m.gguf", (1, 1))                      # another install: other path, other mtime
    assert gguf_cache_dir(a / "m.gguf") == gguf_cache_dir(b / "m.gguf")
    assert gguf_cache_dir(a / "m.gguf") != gguf_cache_dir(c / "m.gguf")
    assert gguf_cache_dir(a / "m.gguf").parent == tmp_path / "cache" / "models"
    assert gguf_cache_dir(a / "m.gguf").name.startswith("m-")


def test_missing_or_wrong_model_paths_fail_with_one_line(tmp_path):
    with pytest.raises(OnecompError, match="does not exist"):
        resolve_model(tmp_path / "nope.gguf")
    with pytest.raises(OnecompError, match="no config.json"):
        resolve_model(tmp_path)
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(OnecompError, match="neither a model folder nor a .gguf"):
        resolve_model(tmp_path / "w.bin")
