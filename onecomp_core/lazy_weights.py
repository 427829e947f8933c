"""Read a checkpoint's tensors one at a time from its safetensors files (never all at once).

Tensors are read with plain positioned reads into freshly allocated memory, not through a memory
map: a map keeps every page it ever touched resident for as long as the file stays open, so a
pass over all blocks would end up holding the whole file in memory (measured: 405 of SmolLM2's
513 MB after one pass) on top of the block it works on.

The safetensors layout: an 8-byte little-endian header length N, N bytes of JSON mapping each
tensor's name to its dtype, shape and [begin, end) byte offsets into the data that follows."""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

from .errors import OnecompError

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)


class _Entry:
    __slots__ = ("file", "dtype", "shape", "begin", "end")

    def __init__(self, file: Path, dtype: str, shape: list, begin: int, end: int):
        self.file, self.dtype, self.shape, self.begin, self.end = file, dtype, shape, begin, end


def read_header(f: Path) -> dict[str, _Entry]:
    """The tensors of one safetensors file (name -> entry with absolute byte offsets)."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError("shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"header length {n} runs past the end of the file ({size} bytes)")
        meta = json.loads(fh.read(n))
    if not isinstance(meta, dict):
        raise ValueError("its header is not a JSON object")
    out, start = {}, 8 + n
    for name, t in meta.items():
        if name == "__metadata__":
            continue
        begin, end = (int(o) + start for o in t["data_offsets"])
        if not start <= begin <= end <= size:
            raise ValueError(f"tensor {name} lies outside the file")
        out[name] = _Entry(f, t["dtype"], [int(d) for d in t["shape"]], begin, end)
    return out


def _read_into(f: Path, offset: int, buf: memoryview) -> int:
    """Fill ``buf`` from ``f`` at ``offset`` (one read may return less than asked) -> bytes read."""
    done = 0
    with open(f, "rb", buffering=0) as fh:
        fh.seek(offset)
        while done < len(buf):
            got = fh.readinto(buf[done:])
            if not got:
                break
            done += got
    return done


class LazyWeights:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            bins = list(self.folder.glob("*.bin"))
            hint = " (convert .bin weights with transformers' save_pretrained)" if bins else ""
            raise OnecompError(f"no .safetensors weights in {self.folder}{hint}")
        self._entries: dict[str, _Entry] = {}
        for f in files:
            try:
                self._entries.update(read_header(f))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise OnecompError(f"corrupt safetensors file {f}: {msg}") from None

    def keys(self):
        return self._entries.keys()

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def _entry(self, key: str) -> _Entry:
        try:
            return self._entries[key]
        except KeyError:
            raise OnecompError(f"tensor {key!r} is missing from the checkpoint in {self.folder}") from None

    def get(self, key: str) -> torch.Tensor:
        return self.read_into(key, None)

    def read_into(self, key: str, out: torch.Tensor | None) -> torch.Tensor:
        """The tensor ``key``, read straight into ``out`` (a contiguous CPU tensor of its dtype and
        size: no second copy in memory) or, without ``out``, into new memory."""
        e = self._entry(key)
        dtype = _SAFETENSORS_DTYPES.get(e.dtype)
        if dtype is None:
            raise OnecompError(f"tensor {key} in {e.file} has dtype {e.dtype}, which onecomp cannot read "
                               f"(it reads {', '.join(_SAFETENSORS_DTYPES)})")
        numel = self.numel(key)
        nbytes = numel * dtype.itemsize
        if nbytes != e.end - e.begin:
            raise OnecompError(f"corrupt safetensors file {e.file} (tensor {key}): {e.end - e.begin} bytes "
                               f"stored for a {e.dtype} tensor of shape {e.shape}")
        if out is not None and (out.dtype != dtype or out.numel() != numel or out.device.type != "cpu"
                                or not out.is_contiguous()):
            raise ValueError(f"read_into: {key} is {e.dtype} {e.shape}, not {out.dtype} {tuple(out.shape)} "
                             f"contiguous on the CPU")
        t = torch.empty(numel, dtype=dtype) if out is None else out.view(-1)
        if _read_into(e.file, e.begin, memoryview(t.view(torch.uint8).numpy())) != nbytes:
            raise OnecompError(f"corrupt safetensors file {e.file} (tensor {key}): truncated")
        return t.reshape(e.shape) if out is None else out

    def numel(self, key: str) -> int:
        """Element count of a tensor, from the header alone."""
        return math.prod(self._entry(key).shape)

    def shape_of(self, key: str) -> tuple[int, ...]:
        """The shape of a tensor, from the header alone."""
        return tuple(self._entry(key).shape)

    def dtype_of(self, key: str) -> torch.dtype:
        """The stored dtype of one tensor, from the header alone."""
        return _SAFETENSORS_DTYPES.get(self._entry(key).dtype, torch.float32)

    def dtype(self) -> torch.dtype:
        """The dtype of the checkpoint's floating-point weights (config's, else the first tensor's)."""
        cfg = json.loads((self.folder / "config.json").read_text())
        name = cfg.get("dtype") or cfg.get("torch_dtype")
        if isinstance(name, str) and hasattr(torch, name):
            return getattr(torch, name)
        return next((d for d in map(self.dtype_of, self._entries) if d.is_floating_point), torch.float32)
