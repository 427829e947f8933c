"""Disk space: the run's need is predicted from the plan and checked before the first block; a
disk that fills mid-run ends the run with one line, leaves no temporary file, keeps the
finished blocks, and the same command resumes."""
import errno
import json
import shutil
from collections import namedtuple

import pytest
import torch

import onecomp_core
from onecomp_core import disk, store
from onecomp_core.cli import main
from onecomp_core.errors import OnecompError
from onecomp_core.testing import quick

Usage = namedtuple("Usage", "total used free")


def safetensors_bytes(folder):
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


@pytest.mark.parametrize("kw", [dict(bits=4, group_size=32), dict(bits=2, group_size=16), dict(bits=3, group_size=-1)])
def test_the_predicted_checkpoint_size_is_the_written_one(tiny_llama, tmp_path, kw):
    rep = onecomp_core.quantize(tiny_llama, tmp_path / "q", **quick(**kw))
    written = safetensors_bytes(tmp_path / "q")
    assert rep["disk"]["checkpoint_mb"] * 2**20 == pytest.approx(written, rel=0.05, abs=0.05 * 2**20)
    assert rep["disk"]["need_mb"] > rep["disk"]["checkpoint_mb"]
    md = (tmp_path / "q" / "report.md").read_text()
    assert f"- **disk**: {rep['disk']['need_mb']} MB predicted at the peak" in md


def test_too_little_free_disk_stops_the_run_before_any_block(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda p: Usage(2**40, 2**40 - 2**20, 2**20))
    with pytest.raises(OnecompError, match=r"the run needs ~\d+ MiB of disk for .*q and its work folder, and .* has "
                                           r"1 MiB free: free some space or choose --out on a larger disk"):
        onecomp_core.quantize(tiny_llama, tmp_path / "q", **quick())
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OnecompError, match="of disk"):                  # a dry run refuses as the run would
        onecomp_core.quantize(tiny_llama, tmp_path / "q", dry_run=True, **quick())


def test_a_dry_run_says_the_disk_need_and_what_is_free(tiny_llama, tmp_path, capsys):
    assert main(["quantize", str(tiny_llama), "--out", str(tmp_path / "q"), "--bits", "4", "--group-size", "32",
                 "--projector", "rtn", "--num-samples", "2", "--seq-len", "32", "--dry-run"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("disk: "))
    assert f"free under {tmp_path}" in line and "at the peak (checkpoint ~" in line


def test_a_full_disk_mid_run_is_one_line_and_the_same_command_resumes(tiny_llama, tmp_path, monkeypatch, capsys):
    real = store.save_file

    def fill_at_block_1(tensors, path, metadata=None):
        if "block-00001" in path:
            with open(path, "wb") as f:                                 # a part written, then no room
                f.write(b"\0" * 100)
            raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(store, "save_file", fill_at_block_1)
    out = tmp_path / "q"
    args = ["quantize", str(tiny_llama), "--out", str(out), "--bits", "4", "--group-size", "32", "--projector", "gptq",
            "--num-samples", "4", "--seq-len", "32"]
    assert main(args) == 2
    err = capsys.readouterr().err
    last = err.splitlines()[-1]                          # after the calibration's few-tokens warning
    assert "Traceback" not in err and last.startswith("onecomp: error: the disk is full (Error while serializing")
    assert "finished blocks are kept and the same command resumes once there is room" in last
    partial = tmp_path / "q.onecomp-partial"
    assert sorted(p.name for p in (partial / "blocks").iterdir()) == ["block-00000.safetensors"]   # no temporary file
    assert not out.exists()
    monkeypatch.setattr(store, "save_file", real)
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["resumed_from_block"] == 1 and not partial.exists()
    onecomp_core.load_quantized(out)


def test_torch_saves_failed_write_is_reported_as_the_full_disk_it_was(tmp_path, monkeypatch):
    def half_written(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"\0" * 10)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(store.torch, "save", half_written)
    monkeypatch.setattr(store.shutil, "disk_usage", lambda p: Usage(2**30, 2**30, 0))
    with pytest.raises(OSError) as e:
        store.atomic_torch_save(tmp_path / "s.pt", {"x": torch.zeros(3)})
    assert e.value.errno == errno.ENOSPC and disk.disk_full(e.value)
    assert list(tmp_path.iterdir()) == []                              # the temporary file is gone
    monkeypatch.setattr(store.shutil, "disk_usage", lambda p: Usage(2**30, 0, 2**30))
    with pytest.raises(OSError) as e:                                  # room left: an I/O error, not a full disk
        store.atomic_torch_save(tmp_path / "s.pt", {"x": torch.zeros(3)})
    assert e.value.errno == errno.EIO and not disk.disk_full(e.value)


def test_what_counts_as_a_full_disk():
    assert disk.disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert disk.disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert disk.disk_full(Exception("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert not disk.disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not disk.disk_full(RuntimeError("shape mismatch"))


def test_free_bytes_looks_at_the_nearest_existing_folder(tmp_path):
    where, free = disk.free_bytes(tmp_path / "a" / "b" / "out")
    assert where == tmp_path and abs(free - shutil.disk_usage(tmp_path).free) < 2**30   # others write meanwhile
