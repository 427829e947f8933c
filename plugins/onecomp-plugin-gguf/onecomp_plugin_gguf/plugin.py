"""Plugin glue: the ``gguf`` exporter. Writes ``model.gguf`` beside the compressed-tensors
checkpoint from the committed blocks: every quantized linear in the ggml type that holds its
grid exactly (blocks.py), built from onecomp's own codes, never re-quantized; the other tensors
in float16 (``gguf.dtype``; 1-D ones in float32, as llama.cpp's converter writes them); the
architecture and tokenizer metadata llama.cpp reads. With ``gguf.requantize=true`` a module whose
own grid has no exact type is written lossily as a K-quant of its bits (rows of 256) or exactly in
a wider legacy type, and each such module's type and error go into ``gguf_requantize.json``."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import attrs
import torch
from safetensors.torch import load_file

from onecomp_core.sdk import Exporter, OnecompError, atomic_json, boolean, hookimpl, one_of

from .blocks import BLOCK, encode, gguf_type
from .kquants import FOR_BITS, QK, encode_k
from .metadata import ARCHS, PERMUTED, add_metadata, check_tokenizer, pre_tokenizer, tensor_name


@attrs.define(frozen=True)
class GGUFOptions:
    dtype: str = attrs.field(default="f16", validator=one_of("f16", "f32"))     # unquantized 2-D tensors
    # llama.cpp's pre-tokenizer name (tokenizer.ggml.pre); auto: read off the source's tokenizer.json
    tokenizer_pre: str = attrs.field(default="auto")
    requantize: bool = attrs.field(default=False, validator=boolean)    # lossy K-quants where no exact type exists


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
        if kind is None and not self.options.requantize:
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
        if self.options.tokenizer_pre == "auto" and pre_tokenizer(source_folder) is None:
            print("onecomp: note: --export gguf does not know llama.cpp's name for this tokenizer's pre-tokenizer, "
                  "so llama.cpp will split text by its default rules (other token ids than transformers'): "
                  "pass --option gguf.tokenizer_pre=NAME (llama.cpp's tokenizer.ggml.pre)", file=sys.stderr)

    def tokenizer_pre(self, source_folder: Path) -> str:
        """``tokenizer.ggml.pre``: as asked, else read off the source's tokenizer ("default" when unknown)."""
        if self.options.tokenizer_pre != "auto":
            return self.options.tokenizer_pre
        return pre_tokenizer(source_folder) or "default"

    def export(self, ectx) -> list[str]:
        import gguf
        folder = Path(ectx.folder)
        cfg = ectx.config
        tmp = folder / ".model.gguf.tmp"
        writer = gguf.GGUFWriter(str(tmp), ARCHS[cfg["model_type"]])
        add_metadata(writer, cfg, Path(ectx.source_folder), self.tokenizer_pre(Path(ectx.source_folder)))
        names = tensor_name(cfg)
        heads = {"q_proj": cfg["num_attention_heads"],
                 "k_proj": cfg.get("num_key_value_heads") or cfg["num_attention_heads"]} \
            if ARCHS[cfg["model_type"]] in PERMUTED else {}                  # NEOX-rotary archs keep HF's rows
        self.requantized = {}
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
        if not self.requantized:
            return ["model.gguf"]
        atomic_json(folder / "gguf_requantize.json", self.requantized)
        worst = max(self.requantized.items(), key=lambda kv: kv[1]["rel_error"])
        kinds = sorted({r["type"] for r in self.requantized.values()})
        print(f"onecomp: note: gguf requantized {len(self.requantized)} modules ({', '.join(kinds)}); largest "
              f"relative error {worst[1]['rel_error']:.4f} ({worst[0]}); per module in gguf_requantize.json",
              file=sys.stderr)
        return ["model.gguf", "gguf_requantize.json"]

    def _add_block(self, writer, tensors: dict, ectx, names, heads) -> None:
        import gguf
        done = set()
        for name, meta in ectx.modules.items():
            if f"{name}.weight_packed" not in tensors:
                continue
            keys = {k: v for k, v in tensors.items() if k.startswith(name + ".") and k != f"{name}.bias"}
            qt = ectx.formats[meta["format"]].from_tensors(name, keys, meta)
            proj = name.rsplit(".", 1)[-1]
            idx = permute_rows(int(meta["shape"][0]), heads[proj]) if proj in heads else None   # llama.cpp's rotary rows
            uniform = meta["format"] == "uniform"
            kind = gguf_type(qt.bits, qt.symmetric, qt.group_size) if uniform else None
            if kind is not None:
                raw = self._exact(qt, idx, kind)
            else:
                kind, raw = self._requantize(name, meta, qt, idx, uniform)
            writer.add_tensor(names(f"{name}.weight"), raw, raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
            done.update(keys)
        for key, t in tensors.items():
            if key not in done:
                self._add_plain(writer, names(key), t)

    @staticmethod
    def _exact(qt, idx, kind: str):
        codes, scale, zero = qt.codes, qt.scale, qt.zero
        if idx is not None:
            codes, scale, zero = codes[idx], scale[idx], zero[idx]
        return encode(codes, scale, zero, qt.group_size, kind)

    def _requantize(self, name: str, meta: dict, qt, idx, uniform: bool):
        """A module with no exact type of its own bits: a K-quant of its bits when its rows are
        whole super-blocks (lossy), else the wider legacy type that holds its grid exactly, else
        Q8_0 (lossy, from the dequantized weights); -> (type, bytes), recorded in requantized."""
        W = qt.dequantize(torch.float32)
        if idx is not None:
            W = W[idx]
        bits = qt.bits if uniform else 2             # binary factors (1-2 bits per weight): Q2_K
        wider = gguf_type(qt.bits, qt.symmetric, qt.group_size, wider=True) if uniform else None
        if W.shape[1] % QK == 0 and bits in FOR_BITS:
            kind, raw = FOR_BITS[bits], encode_k(W, FOR_BITS[bits])
        elif wider is not None:
            kind, raw = wider, self._exact(qt, idx, wider)
        else:
            import gguf
            kind, raw = "Q8_0", gguf.quants.quantize(W.numpy(), gguf.GGMLQuantizationType.Q8_0)
        back = dequantized(raw, kind, W.shape)
        self.requantized[name] = {"type": kind, "bits_per_weight": round(raw.size * 8 / W.numel(), 4),
                                  "rel_error": float((back - W).norm() / W.norm().clamp_min(1e-30))}
        return kind, raw

    def _add_plain(self, writer, name: str, t: torch.Tensor) -> None:
        t = t.float()
        dtype = torch.float32 if t.dim() == 1 or self.options.dtype == "f32" else torch.float16
        writer.add_tensor(name, t.to(dtype).numpy())


def dequantized(raw, kind: str, shape) -> torch.Tensor:
    """ggml's own dequantization (gguf-py) of ``raw``: what llama.cpp will compute with."""
    import gguf
    return torch.from_numpy(gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, kind)).copy()).reshape(shape)


@hookimpl
def onecomp_register_exporters(registry):
    registry.add_exporter(GGUFExporter)
