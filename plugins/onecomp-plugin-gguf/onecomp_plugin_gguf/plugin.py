"""Plugin glue: the ``gguf`` exporter. Writes ``model.gguf`` beside the compressed-tensors
checkpoint from the committed blocks: every quantized linear in the ggml type that holds its
grid exactly (blocks.py), built from onecomp's own codes, never re-quantized; the other tensors
in float16 (``gguf.dtype``; 1-D ones in float32, as llama.cpp's converter writes them); the
architecture and tokenizer metadata llama.cpp reads."""
from __future__ import annotations

import os
from pathlib import Path

import attrs
import torch
from safetensors.torch import load_file

from onecomp_core.sdk import Exporter, OnecompError, hookimpl, one_of

from .blocks import BLOCK, encode, gguf_type
from .metadata import ARCHS, add_metadata, check_tokenizer, tensor_name


@attrs.define(frozen=True)
class GGUFOptions:
    dtype: str = attrs.field(default="f16", validator=one_of("f16", "f32"))     # unquantized 2-D tensors
    tokenizer_pre: str = attrs.field(default="default")     # llama.cpp's pre-tokenizer name (tokenizer.ggml.pre)


def permute_rows(rows: int, heads: int) -> torch.Tensor:
    """The row order llama.cpp's rotary layout expects of q/k (its converter's permutation of
    Hugging Face's half-split rotary into interleaved pairs): new row r = old row idx[r]."""
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


class GGUFExporter(Exporter):
    name = "gguf"
    suffix = "model.gguf"
    Options = GGUFOptions

    def check(self, spec, fmt) -> None:
        kind = gguf_type(spec.bits, spec.symmetric, spec.group_size) if fmt.name == "uniform" else None
        if kind is None:
            grid = (f"{fmt.name} format" if fmt.name != "uniform" else
                    f"{spec.bits}-bit {'symmetric' if spec.symmetric else 'asymmetric'} group {spec.group_size}")
            raise OnecompError(
                f"--export gguf writes only grids GGUF holds exactly (4-bit with a group size that is a multiple "
                f"of {BLOCK} or -1: Q4_1, with --sym Q4_0; symmetric 8-bit: Q8_0); {spec.name} is {grid}: "
                f"use --bits 4 --group-size 128 or drop --export gguf")

    def check_model(self, config: dict, source_folder: Path, shapes: dict) -> None:
        arch = config.get("model_type")
        if arch not in ARCHS:
            raise OnecompError(f"--export gguf writes {', '.join(sorted(ARCHS))} models, not {arch!r}; "
                               f"drop --export gguf")
        bad = next((n for n, (_, cols) in shapes.items() if cols % BLOCK), None)
        if bad is not None:
            raise OnecompError(f"--export gguf needs every quantized linear's inputs in blocks of {BLOCK}; "
                               f"{bad} has {shapes[bad][1]}: drop --export gguf")
        check_tokenizer(source_folder)

    def export(self, ectx) -> list[str]:
        import gguf
        folder = Path(ectx.folder)
        cfg = ectx.config
        tmp = folder / ".model.gguf.tmp"
        writer = gguf.GGUFWriter(str(tmp), ARCHS[cfg["model_type"]])
        add_metadata(writer, cfg, Path(ectx.source_folder), self.options.tokenizer_pre)
        names = tensor_name(cfg)
        heads = {"q_proj": cfg["num_attention_heads"],
                 "k_proj": cfg.get("num_key_value_heads") or cfg["num_attention_heads"]}
        for f in ectx.block_files:
            self._add_block(writer, load_file(str(f)), ectx, names, heads)
        for key, t in ectx.outer_tensors().items():
            self._add_plain(writer, names(key), t)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, folder / "model.gguf")
        return ["model.gguf"]

    def _add_block(self, writer, tensors: dict, ectx, names, heads) -> None:
        import gguf
        done = set()
        for name, meta in ectx.modules.items():
            if f"{name}.weight_packed" not in tensors:
                continue
            keys = {k: v for k, v in tensors.items() if k.startswith(name + ".") and k != f"{name}.bias"}
            qt = ectx.formats[meta["format"]].from_tensors(name, keys, meta)
            codes, scale, zero = qt.codes, qt.scale, qt.zero
            proj = name.rsplit(".", 1)[-1]
            if proj in heads:                     # llama.cpp's rotary row order
                idx = permute_rows(codes.shape[0], heads[proj])
                codes, scale, zero = codes[idx], scale[idx], zero[idx]
            kind = gguf_type(qt.bits, qt.symmetric, qt.group_size)
            raw = encode(codes, scale, zero, qt.group_size, kind)
            writer.add_tensor(names(f"{name}.weight"), raw, raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
            done.update(keys)
        for key, t in tensors.items():
            if key not in done:
                self._add_plain(writer, names(key), t)

    def _add_plain(self, writer, name: str, t: torch.Tensor) -> None:
        t = t.float()
        dtype = torch.float32 if t.dim() == 1 or self.options.dtype == "f32" else torch.float16
        writer.add_tensor(name, t.to(dtype).numpy())


@hookimpl
def onecomp_register_exporters(registry):
    registry.add_exporter(GGUFExporter)
