"""Read a checkpoint's tensors one at a time from its safetensors files (never all at once)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import OnecompError

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


class LazyWeights:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            bins = list(self.folder.glob("*.bin"))
            hint = " (convert .bin weights with transformers' save_pretrained)" if bins else ""
            raise OnecompError(f"no .safetensors weights in {self.folder}{hint}")
        self._where: dict[str, Path] = {}
        self._handles = {}
        for f in files:
            try:
                h = safe_open(str(f), framework="pt")
                keys = list(h.keys())
            except Exception as exc:
                raise OnecompError(f"corrupt safetensors file {f}: {str(exc).splitlines()[0]}") from None
            self._handles[f] = h
            for k in keys:
                self._where[k] = f

    def keys(self):
        return self._where.keys()

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        try:
            f = self._where[key]
        except KeyError:
            raise OnecompError(f"tensor {key!r} is missing from the checkpoint in {self.folder}") from None
        try:
            return self._handles[f].get_tensor(key)
        except Exception as exc:
            raise OnecompError(f"corrupt safetensors file {f} (tensor {key}): {str(exc).splitlines()[0]}") from None

    def numel(self, key: str) -> int:
        """Element count of a tensor, from the header alone."""
        shape = self._handles[self._where[key]].get_slice(key).get_shape()
        n = 1
        for d in shape:
            n *= int(d)
        return n

    def dtype_of(self, key: str) -> torch.dtype:
        """The stored dtype of one tensor, from the header alone."""
        name = self._handles[self._where[key]].get_slice(key).get_dtype()
        return _SAFETENSORS_DTYPES.get(name, torch.float32)

    def dtype(self) -> torch.dtype:
        """The dtype of the checkpoint's floating-point weights (config's, else the first tensor's)."""
        cfg = json.loads((self.folder / "config.json").read_text())
        name = cfg.get("dtype") or cfg.get("torch_dtype")
        if isinstance(name, str) and hasattr(torch, name):
            return getattr(torch, name)
        for k in self._where:
            t = self.get(k)
            if t.is_floating_point():
                return t.dtype
        return torch.float32
