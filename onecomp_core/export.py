"""The main exporter, ``compressed-tensors``: the checkpoint onecomp, transformers and vLLM load.

Layout: ``config.json`` (with compressed-tensors' ``quantization_config`` when every quantized
module's format has one, plus what the transforms add), tokenizer files, safetensors shards (one
per block plus the outer tensors) with ``model.safetensors.index.json``, and ``onecomp.json``
(per-module format metadata, the run's config). Formats without a compressed-tensors scheme
(binary factors) are written in their own tensor layout in the same shards; such a checkpoint
loads with ``onecomp_core.load_quantized``.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from safetensors import safe_open

from .checkpoint import META
from .components import Exporter
from .store import atomic_json, atomic_save_tensors

COPY = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
        "generation_config.json", "vocab.json", "merges.txt", "chat_template.jinja", "added_tokens.json")


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the file system allows it (the work folder's block files are final and
    never written again), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


class CompressedTensorsExporter(Exporter):
    name = "compressed-tensors"

    def export(self, ectx) -> list[str]:
        folder = Path(ectx.folder)
        weight_map = {}
        files = []
        for i, src in enumerate(ectx.block_files):
            name = f"model-block-{i:05d}.safetensors"
            link_or_copy(src, folder / name)
            files.append(name)
            with safe_open(str(src), "pt") as f:
                weight_map.update({k: name for k in f.keys()})
        outer = ectx.outer_tensors()
        atomic_save_tensors(folder / "model-outer.safetensors", outer, metadata={"format": "pt"})
        weight_map.update({k: "model-outer.safetensors" for k in outer})
        atomic_json(folder / "model.safetensors.index.json", {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))})
        config = dict(ectx.config)
        config.pop("quantization_config", None)
        fmt_names = {m["format"] for m in ectx.modules.values()}
        if len(fmt_names) == 1:
            (fname,) = fmt_names
            qc = ectx.formats[fname].checkpoint_config(ectx.modules)
            if qc is not None:
                config["quantization_config"] = qc
        atomic_json(folder / "config.json", config)
        atomic_json(folder / META, {"modules": ectx.modules, **ectx.meta})
        files += ["model-outer.safetensors", "model.safetensors.index.json", "config.json", META]
        for f in COPY:
            if (Path(ectx.source_folder) / f).is_file():
                shutil.copyfile(Path(ectx.source_folder) / f, folder / f)
                files.append(f)
        return files
