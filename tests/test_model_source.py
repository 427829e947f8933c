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


def test_mistyped_local_paths_are_never_sent_to_a_hub(tmp_path, monkeypatch):
    import onecomp_core.model_source as ms
    from onecomp_core.calibration import read_documents
    from onecomp_core.errors import OnecompError
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "data").mkdir()
    monkeypatch.setattr(ms, "_download", lambda s: (_ for _ in ()).throw(AssertionError(f"fetched {s}")))
    for s in ("models/tinyy", "./tiny", "~/no/model", "model.gguf", "x/y/z"):
        with pytest.raises(OnecompError, match="does not exist"):
            ms.resolve_model(s)
    for s in ("data/enwiki_calb.txt", "./cal.jsonl", "data/cal"):
        with pytest.raises(OnecompError, match="does not exist"):
            read_documents(s)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OnecompError, match="offline mode .* forbids fetching it"):
        ms.resolve_model("someorg/somemodel")
    with pytest.raises(OnecompError, match="offline mode .* forbids fetching it"):
        read_documents("someorg/somedata")


def test_a_calibration_file_that_is_not_text_is_refused(tmp_path):
    from onecomp_core.calibration import read_documents
    from onecomp_core.errors import OnecompError
    (tmp_path / "bin.txt").write_bytes(bytes(range(256)) * 40)
    with pytest.raises(OnecompError, match="is not text"):
        read_documents(str(tmp_path / "bin.txt"))
    (tmp_path / "latin.txt").write_bytes("caf\xe9 ".encode("latin-1") * 200)
    with pytest.raises(OnecompError, match="is not UTF-8 text"):
        read_documents(str(tmp_path / "latin.txt"))
    (tmp_path / "ok.txt").write_text("plain text\n\nanother paragraph", encoding="utf-8")
    assert read_documents(str(tmp_path / "ok.txt")) == ["plain text", "another paragraph"]


def test_weights_digest_sees_a_rewrite_of_the_same_size_and_time(tmp_path):
    """The resume fingerprint and AutoBit's cache key hash the weights' bytes: an in-place change
    that keeps size and modification time is still seen."""
    import os
    import torch
    from safetensors.torch import save_file
    from onecomp_core import hashing
    f = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(4, 4)}, str(f))
    (tmp_path / "config.json").write_text("{}")
    before = hashing.weights_digest(tmp_path)
    st = f.stat()
    save_file({"w": torch.ones(4, 4)}, str(f))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size
    hashing.clear_memo()
    assert hashing.weights_digest(tmp_path) != before


def test_every_command_works_on_local_inputs_with_the_network_blocked(tiny_llama, tmp_path):
    """HF_HUB_OFFLINE=1 and a proxy that leads nowhere: quantize, eval, plugins and config run on
    local inputs; a mistyped local path gets the local error, not a network one."""
    import os
    import subprocess
    import sys
    dead = "http://10.255.255.1:9"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HTTP_PROXY": dead, "HTTPS_PROXY": dead, "ALL_PROXY": dead,
           "ONECOMP_PROGRESS": "0", "ONECOMP_CACHE": str(tmp_path / "cache")}
    text = tmp_path / "t.txt"
    text.write_text("Some local text for calibration and evaluation. " * 200)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "onecomp_core.cli", *args], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=600)

    q = cli("quantize", str(tiny_llama), "--projector", "rtn", "--num-samples", "2", "--seq-len", "32",
            "--calibration", str(text), "--out", str(tmp_path / "q"))
    assert q.returncode == 0, q.stderr[-1500:]
    e = cli("eval", str(tmp_path / "q"), "--text", str(text), "--ref", str(tiny_llama), "--json", "--max-tokens", "256")
    assert e.returncode == 0 and '"kl"' in e.stdout, e.stderr[-1500:]
    assert cli("plugins").returncode == 0
    assert cli("config", "--show", str(tiny_llama)).returncode == 0
    bad = cli("quantize", "./modls/tiny", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "does not exist" in bad.stderr and bad.stderr.strip().count("\n") == 0
