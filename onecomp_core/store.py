"""The run's work folder beside the output: finished blocks, the streams after the last finished
block, and a state file, so a killed run resumes after its last finished block.

Commit protocol: a block's tensors and the streams that leave it are written to new files and
made durable (file and folder fsync'd) first; then the state file, which names the streams file,
is replaced in one atomic step: that is the commit. Until it happens the previous state, naming
the previous streams file (kept until then), is current, so a kill at any point resumes from a
consistent pair. The streams file also records the block it enters, checked on resume."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import OnecompError

STATE = "state.json"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _durable_replace(tmp: Path, path: Path) -> None:
    """Make ``tmp`` durable, rename it to ``path``, make the rename durable."""
    _fsync_path(tmp)
    os.replace(tmp, path)
    _fsync_path(path.parent)


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _written(tmp: Path, path: Path, write) -> None:
    """``write(tmp)``, then the durable rename to ``path``; a failed write leaves no temporary file
    behind, and torch's archive writer's failure (its message says only "unexpected pos") is
    raised as the OSError it was: ENOSPC where the disk has no room left."""
    try:
        write(tmp)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, RuntimeError) and "inline_container" in str(exc):
            full = shutil.disk_usage(path.parent).free < 2**24
            raise OSError(errno.ENOSPC if full else errno.EIO,
                          f"{'No space left on device' if full else 'write failed'} writing {path}") from exc
        raise
    _durable_replace(tmp, path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    _written(_tmp(path), path, write)


def atomic_json(path: Path, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def atomic_save_tensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _written(_tmp(path), path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def atomic_torch_save(path: Path, obj, checksum: bool = True) -> None:
    """torch.save through a temporary file; ``checksum=False`` skips the archive's CRC-32 (where
    torch can), which is most of the time of saving a large tensor: for scratch files that the
    atomic rename already guards, such as the streams between blocks."""
    def write(tmp):
        with contextlib.nullcontext() if checksum else _no_crc32():
            torch.save(obj, tmp)
    _written(_tmp(path), path, write)


def _no_crc32():
    try:
        from torch.utils.serialization import config
        return config.patch({"save.compute_crc32": False})
    except (ImportError, AttributeError):        # torch < 2.6: no such setting
        return contextlib.nullcontext()


class RunStore:
    def __init__(self, out: Path, fingerprint: str, overwrite: bool, dry_run: bool = False):
        """``dry_run``: only read, and say in ``self.outlook`` what the run would do."""
        self.out = Path(out)
        self.work = self.out.with_name(self.out.name + ".onecomp-partial")
        self.fingerprint = fingerprint
        self.outlook = self.look(overwrite)
        if self.outlook[0] == "start over" and not dry_run:
            shutil.rmtree(self.work)

    def look(self, overwrite: bool) -> tuple[str, str]:
        """(what happens to ``out`` and the work folder, a line saying so); raises where the run
        would refuse: ``out`` exists, or the work folder holds another config's unfinished run,
        without ``overwrite``."""
        if self.out.exists() and not overwrite:
            raise OnecompError(f"output {self.out} already exists; choose another --out or pass --overwrite")
        replaces = f"; replaces {self.out} when it finishes (--overwrite)" if self.out.exists() else ""
        state = self.read_state()
        if state is not None and state.get("fingerprint") != self.fingerprint:
            if not overwrite:
                raise OnecompError(f"{self.work} holds an unfinished run with a different config; use the same "
                                   f"config to resume it, or pass --overwrite to start over")
            return "start over", f"discards the unfinished run of another config in {self.work}{replaces}"
        if self.finished:
            return "resume", f"resumes after block {self.finished} (finished in {self.work}){replaces}"
        return "new", f"a new run{replaces}"

    def read_state(self) -> dict | None:
        p = self.work / STATE
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError:
            return None

    @property
    def finished(self) -> int:
        state = self.read_state()
        return int(state["finished_blocks"]) if state and state.get("fingerprint") == self.fingerprint else 0

    def block_file(self, i: int) -> Path:
        return self.work / "blocks" / f"block-{i:05d}.safetensors"

    def _write_state(self, **fields) -> None:
        """Rewrite the state file with ``fields`` changed (the state of another config is dropped)."""
        state = self.read_state() or {}
        if state.get("fingerprint") != self.fingerprint:
            state = {}
        state.update(fields, fingerprint=self.fingerprint)
        atomic_json(self.work / STATE, state)

    def streams_file(self, entering: int) -> Path:
        return self.work / f"streams-{entering:05d}.pt"

    def commit_block(self, i: int, tensors: dict, streams: dict, info: dict) -> None:
        """Block ``i`` is finished: its tensors, the streams entering block i + 1, then the state."""
        (self.work / "blocks").mkdir(parents=True, exist_ok=True)    # first write creates the folder
        atomic_save_tensors(self.block_file(i), tensors)
        atomic_torch_save(self.streams_file(i + 1), {"entering": i + 1, **{k: v.cpu() for k, v in streams.items()}},
                          checksum=False)
        layers = self.layer_info()
        layers.update(info)
        self._write_state(finished_blocks=i + 1, layers=layers, streams=self.streams_file(i + 1).name)
        old = self.streams_file(i)
        if old.exists():                                              # no longer named by the state
            old.unlink()

    def streams(self) -> dict:
        """The streams entering the first unfinished block, as the state names them."""
        state = self.read_state() or {}
        n = self.finished
        path = self.work / str(state.get("streams", ""))
        try:
            s = torch.load(path, weights_only=True)
        except Exception:
            s = None
        if not isinstance(s, dict) or s.get("entering") != n:
            raise OnecompError(f"{self.work} says {n} blocks are finished but holds no streams entering block {n}; "
                               f"pass --overwrite to start over")
        return s

    def layer_info(self) -> dict:
        state = self.read_state() or {}
        return dict(state.get("layers", {})) if state.get("fingerprint") == self.fingerprint else {}

    def publish(self, final: Path) -> None:
        """Move the assembled folder to ``out`` (replacing an old one only now), drop the work."""
        old = None
        if self.out.exists():
            old = self.work / "previous"
            os.replace(self.out, old)
        os.replace(final, self.out)
        shutil.rmtree(self.work, ignore_errors=True)


class FollowerStore:
    """The store of a data-parallel rank other than 0: the leader (rank 0) writes the work folder;
    this rank writes nothing there (its spilled streams, if any, go to a folder of its own)."""

    def __init__(self, out: Path, rank: int):
        self.out = Path(out)
        self.work = self.out.with_name(f".{self.out.name}.onecomp-rank{rank}")

    def commit_block(self, i: int, tensors: dict, streams: dict, info: dict) -> None:
        pass
