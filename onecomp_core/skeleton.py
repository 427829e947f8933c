"""The model as an empty (meta-device) skeleton whose parts are filled from the checkpoint on
demand: the embedding and head once, the decoder blocks one at a time."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from .adapters import find_adapter
from .errors import OnecompError
from .lazy_weights import LazyWeights


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise OnecompError(f"device {device!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OnecompError(f"device {device!r} asked for but CUDA is not available; use device=auto or cpu")
    return dev


def compute_dtype(checkpoint_dtype: torch.dtype, device: torch.device, requested: str = "auto") -> torch.dtype:
    """The checkpoint's dtype, except fp16 on a CPU (whose fp16 matmuls are ~100x slower): fp32."""
    if requested != "auto":
        if not hasattr(torch, requested) or not isinstance(getattr(torch, requested), torch.dtype):
            raise OnecompError(f"dtype {requested!r} is not a torch dtype; use auto, float32, bfloat16 or float16")
        return getattr(torch, requested)
    if device.type == "cpu" and checkpoint_dtype == torch.float16:
        return torch.float32
    return checkpoint_dtype if checkpoint_dtype.is_floating_point else torch.float32


def forward_autocast(requested: str, device: torch.device, compute: torch.dtype) -> torch.dtype | None:
    """The dtype the layer-wise pass's block forwards autocast to (None: none). ``auto``: bfloat16
    on a CPU whose matmuls have a native bfloat16 path (~3.7x a float32 linear on AVX512-BF16,
    measured) when the model computes in float32; nothing elsewhere."""
    if requested == "off":
        return None
    if requested in ("bfloat16", "statistics"):
        return torch.bfloat16
    native = device.type == "cpu" and torch.backends.mkldnn.is_available() and _mkldnn_bf16()
    return torch.bfloat16 if native and compute == torch.float32 else None


def _mkldnn_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):       # a torch without the probe: assume no native path
        return False


def storage_dtype(checkpoint_dtype: torch.dtype, requested: str = "auto") -> torch.dtype:
    """The dtype of the unquantized floating tensors a checkpoint is written with: ``auto``
    keeps a 16-bit source's dtype and writes float16 for a float32 one (half the bytes; the
    quantized weights' scales are 16-bit values already)."""
    if requested != "auto":
        return getattr(torch, requested)
    return checkpoint_dtype if checkpoint_dtype in (torch.float16, torch.bfloat16) else torch.float16


def as_stored(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as written: a floating tensor in ``dtype``, or in bfloat16 where float16 cannot hold
    its values (beyond +-65504)."""
    if not t.is_floating_point() or t.dtype == dtype:
        return t
    if dtype == torch.float16 and t.numel() and not bool(t.abs().max() <= torch.finfo(torch.float16).max):
        return t.to(torch.bfloat16)
    return t.to(dtype)


def load_config(folder: Path):
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(str(folder))
    except Exception as exc:
        raise OnecompError(f"cannot read {folder}/config.json: {str(exc).splitlines()[0]}") from None


class Skeleton:
    def __init__(self, folder: Path, registry, device: torch.device, dtype: str = "auto", store_dtype: str = "auto"):
        from transformers import AutoModelForCausalLM
        self.folder = Path(folder)
        self.config = load_config(self.folder)
        if getattr(self.config, "quantization_config", None) is not None:
            del self.config.quantization_config     # onecomp builds its own quantized modules
        self.adapter = find_adapter(self.config, registry)
        self.weights = LazyWeights(self.folder)
        self.checkpoint_dtype = self.weights.dtype()
        self.device = device
        self.dtype = compute_dtype(self.checkpoint_dtype, device, dtype)
        self.store_dtype = storage_dtype(self.checkpoint_dtype, store_dtype)
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = AutoModelForCausalLM.from_config(self.config,
                                                          dtype=self.dtype)
        self.model.eval()
        self.blocks = self.model.get_submodule(self.adapter.blocks_path())
        for i in range(len(self.blocks)):
            self.blocks[i] = self.adapter.prepare_block(self.blocks[i])
        emb = self.model.get_input_embeddings().weight
        self.embed_key = next(n for n, p in self.model.named_parameters() if p is emb)
        self.transforms: list = []      # fitted preprocessors' transforms, applied as parts are loaded
        self._cached_block: tuple | None = None

    def block_prefix(self, i: int) -> str:
        return f"{self.adapter.blocks_path()}.{i}"

    def fill(self, module: nn.Module, prefix: str, skip: tuple = ()) -> nn.Module:
        """Allocate ``module`` on the device and load its tensors from the checkpoint. Submodules
        already holding real tensors (quantized layers built by a format) are left alone, and so
        are those named in ``skip`` (e.g. a head about to be tied to the embedding)."""
        done = [n for n, m in module.named_modules(prefix=prefix) if getattr(m, "onecomp_quantized", False)]
        done += list(skip)
        with torch.no_grad():
            for name, sub in module.named_modules(prefix=prefix):
                if any(name == d or name.startswith(d + ".") for d in done):
                    continue
                direct = list(sub.named_parameters(recurse=False)) + list(sub.named_buffers(recurse=False))
                if not direct:
                    continue
                sub.to_empty(device=self.device, recurse=False)
                if next(sub.named_buffers(recurse=False), None) is not None:
                    self.model._init_weights(sub)   # computed buffers such as rotary inv_freq
                for pname, t in sub.state_dict(keep_vars=True).items():
                    if "." in pname:
                        continue
                    full = f"{name}.{pname}" if name else pname
                    key = self._key(full)
                    shape = self.weights.shape_of(key)
                    if shape != tuple(t.shape):
                        raise OnecompError(f"checkpoint tensor for {full} has shape {shape}, "
                                           f"the model expects {tuple(t.shape)}")
                    if t.device.type == "cpu" and t.is_contiguous() and self.weights.dtype_of(key) == t.dtype:
                        self.weights.read_into(key, t.data)       # straight into place: no second copy
                    else:
                        t.data.copy_(self.weights.get(key).to(t.dtype))
        return module

    def _key(self, key: str) -> str:
        """The checkpoint's name for the model's tensor ``key``."""
        for k in self.adapter.checkpoint_keys(key):
            if k in self.weights:
                return k
        if key.endswith("lm_head.weight") and getattr(self.config, "tie_word_embeddings", False) \
                and key not in self.weights:
            return self.embed_key
        return key                      # reading it raises the "missing tensor" error

    def _read(self, key: str) -> torch.Tensor:
        return self.weights.get(self._key(key))

    def block(self, i: int) -> nn.Module:
        """Block ``i`` loaded from the checkpoint, with the transforms applied in order."""
        block = self.fill(self.blocks[i], self.block_prefix(i))
        for t in self.transforms:
            t.apply_block(i, block)
        return block

    def linear_weight(self, name: str) -> torch.Tensor:
        """A quantizable linear's FP weight as the layer-wise pass will see it: straight from the
        checkpoint, or, under transforms, from its transformed block (the last one kept)."""
        if not self.transforms:
            return self.weights.get(name + ".weight")
        i = next(i for i in range(len(self.blocks)) if name.startswith(self.block_prefix(i) + "."))
        if self._cached_block is None or self._cached_block[0] != i:
            block = self.block(i)
            self._cached_block = (i, {n: m.weight.detach().clone() for n, m in block.named_modules()
                                      if isinstance(m, nn.Linear)})
            self.release_block(i)
        return self._cached_block[1][name[len(self.block_prefix(i)) + 1:]]

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Every quantizable linear (adapter's groups, execution order) and its (out, in)."""
        shapes = {}
        for i, blk in enumerate(self.blocks):
            for group in self.adapter.linear_groups(blk):
                for rel in group:
                    lin = blk.get_submodule(rel)
                    shapes[f"{self.block_prefix(i)}.{rel}"] = (lin.out_features, lin.in_features)
        return shapes

    def release_block(self, i: int) -> None:
        self.blocks[i] = self.blocks[i].to("meta")

    def outer_modules(self) -> list[tuple[str, nn.Module]]:
        """Top-level parts outside the blocks (embeddings, norms, rotary, head), as leaves."""
        bp = self.adapter.blocks_path()
        out = []
        for name, mod in self.model.named_modules():
            if not name or name == bp or name.startswith(bp + ".") or bp.startswith(name + "."):
                continue
            if any(name.startswith(o + ".") for o, _ in out):
                continue
            out.append((name, mod))
        return out

    def fill_outer(self) -> None:
        """Load the parts outside the blocks, with the transforms applied."""
        for name, mod in self.outer_modules():
            self.fill(mod, name)
        head, norm = self.model.get_output_embeddings(), self.final_norm()
        for t in self.transforms:
            t.apply_final(norm, head)
            t.apply_outer(self.model.get_input_embeddings(), head)

    def final_norm(self) -> nn.Module | None:
        """The norm between the last block and the head (the adapter's ``final_norm_path``)."""
        path = self.adapter.final_norm_path()
        return self.model.get_submodule(path) if path else None

    def release_outer(self) -> None:
        for _, mod in self.outer_modules():
            mod.to("meta")

    def outer_tensors(self, tied: bool) -> dict[str, torch.Tensor]:
        """The tensors outside the blocks as they are saved (floats in ``store_dtype``), without the
        head when ``tied`` to the embedding. Without transforms they are read straight from the checkpoint (nothing is
        materialised twice); with transforms the outer modules are loaded, transformed and their
        tensors taken as they are."""
        keys = [f"{m}.{p}" for m, mod in self.outer_modules() for p in mod.state_dict()]
        keys = [k for k in keys if not (tied and k.endswith("lm_head.weight"))]
        if not self.transforms:
            return {k: as_stored(self._read(k), self.store_dtype) for k in keys}
        self.fill_outer()
        live = {f"{m}.{p}": t for m, mod in self.outer_modules() for p, t in mod.state_dict().items()}
        out = {k: as_stored(live[k].detach(), self.store_dtype) for k in keys}
        self.release_outer()                     # the modules go back to meta; ``out`` keeps the tensors
        return out

    def config_dict(self) -> dict:
        return json.loads((self.folder / "config.json").read_text())
