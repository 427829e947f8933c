"""A model larger than the memory the run may use: build a synthetic Llama-shaped float16
checkpoint (random weights, written block by block so this script never holds it either),
then quantize it with GPTQ 4b/g128 under ``--max-memory CAP`` and, where this process may
create one, inside a cgroup (v1 memory controller) whose limit is CAP: a run that needed more
resident memory would be stopped by the kernel instead of passing (page cache of the mapped
checkpoint counts too, and is reclaimed first). Prints one JSON line: the checkpoint's bytes,
the cap, the run's peak RSS and the cgroup's peak usage, its wall time and seconds per block,
and whether the streams went to disk. (``prlimit --data`` is no such cap: it limits virtual
private memory, which glibc's arenas and torch's reservations exceed long before RSS does.)

    OMP_NUM_THREADS=2 python bench/larger_than_memory.py [--hidden 3072 --inter 8192 --layers 28] [--cap 3GB]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def build(folder: Path, hidden: int, inter: int, layers: int, heads: int, kv_heads: int) -> int:
    """Write the synthetic checkpoint (one safetensors file per block) -> its tensor bytes."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig
    from onecomp_core.model_source import resolve_model
    tok_src = resolve_model("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(str(tok_src))
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=len(tok),
                      max_position_embeddings=2048, tie_word_embeddings=True, torch_dtype="float16",
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    head_dim = hidden // heads

    def w(*shape):
        return (torch.randn(*shape, generator=g) * shape[-1] ** -0.5).half()
    index, total = {}, 0

    def write(name: str, tensors: dict) -> None:
        nonlocal total
        save_file(tensors, str(folder / name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        index.update(dict.fromkeys(tensors, name))
    write("model-outer.safetensors", {"model.embed_tokens.weight": w(len(tok), hidden),
                                      "model.norm.weight": torch.ones(hidden).half()})
    for i in range(layers):                      # one block in memory at a time
        p = f"model.layers.{i}."
        write(f"model-{i:05d}.safetensors", {
            p + "self_attn.q_proj.weight": w(hidden, hidden), p + "self_attn.k_proj.weight": w(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": w(kv_heads * head_dim, hidden), p + "self_attn.o_proj.weight": w(hidden, hidden),
            p + "mlp.gate_proj.weight": w(inter, hidden), p + "mlp.up_proj.weight": w(inter, hidden),
            p + "mlp.down_proj.weight": w(hidden, inter),
            p + "input_layernorm.weight": torch.ones(hidden).half(),
            p + "post_attention_layernorm.weight": torch.ones(hidden).half()})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": index}))
    cfg.save_pretrained(folder)
    tok.save_pretrained(folder)
    return total


def memory_cgroup(cap: int) -> Path | None:
    """A fresh cgroup (v1 memory controller) limited to ``cap`` bytes of memory (and of memory +
    swap where swap is accounted), or None where this process cannot create one."""
    root = Path("/sys/fs/cgroup/memory")
    group = root / f"onecomp-bench-{os.getpid()}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(cap))
        memsw = group / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            memsw.write_text(str(cap))
        return group
    except OSError:
        if group.is_dir():
            group.rmdir()
        return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=3072)
    ap.add_argument("--inter", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--cap", default="3GB", help="the memory the run may use")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "onecomp-larger-than-memory")
    ap.add_argument("--num-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--keep", action="store_true", help="keep the synthetic model for another run")
    ap.add_argument("--option", action="append", default=[], help="a component option for the run, e.g. gptq.mse_steps=0")
    a = ap.parse_args()
    from onecomp_core.resources import parse_size
    model = a.work / f"llama-{a.hidden}-{a.inter}-{a.layers}"
    t0 = time.time()
    if not (model / "model.safetensors.index.json").is_file():
        shutil.rmtree(model, ignore_errors=True)
        build(model, a.hidden, a.inter, a.layers, a.heads, a.kv_heads)
    model_bytes = json.loads((model / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    build_s = time.time() - t0
    out = a.work / "q"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_name("q.onecomp-partial"), ignore_errors=True)
    cap = parse_size(a.cap)
    cmd = [sys.executable, "-m", "onecomp_core.cli", "quantize", str(model), "--out", str(out), "--bits", "4",
           "--group-size", "128", "--projector", "gptq", "--calibration", str(ROOT / "data" / "enwiki_calib.txt"),
           "--num-samples", str(a.num_samples), "--seq-len", str(a.seq_len), "--max-memory", a.cap,
           *[f for o in a.option for f in ("--option", o)]]
    group = memory_cgroup(cap)
    if group is not None:         # the child joins the cgroup before it becomes python
        cmd = ["sh", "-c", f'echo $$ > {group / "cgroup.procs"} && exec "$@"', "sh", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=a.work, env={**os.environ, "ONECOMP_PROGRESS": "0"})
    row = {"bench": "larger_than_memory", "model_gb": round(model_bytes / 1e9, 3), "cap_gb": round(cap / 1e9, 3),
           "enforced_with": "cgroup v1 memory.limit_in_bytes" if group else "--max-memory accounting only",
           "shape": {"hidden": a.hidden, "intermediate": a.inter, "layers": a.layers},
           "calibration": f"{a.num_samples} x {a.seq_len}", "options": a.option, "build_s": round(build_s, 1),
           "returncode": proc.returncode}
    if group is not None:
        row["cgroup_peak_gb"] = round(int((group / "memory.max_usage_in_bytes").read_text()) / 1e9, 3)
        row["cgroup_oom_events"] = int((group / "memory.failcnt").read_text())
        group.rmdir()
    if proc.returncode != 0:
        row["error"] = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
    else:
        s = json.loads((out / "report.json").read_text())["summary"]
        row.update(peak_rss_gb=round(s["peak_rss_mb"] * 2**20 / 1e9, 3), under_cap=s["peak_rss_mb"] * 2**20 < cap,
                   wall_s=s["wall_seconds"], s_per_block=s["seconds_per_block"], streams_on_disk=s["streams_on_disk"],
                   checkpoint_gb=round(s["checkpoint_mb"] * 2**20 / 1e9, 3), bpw=s["bpw"])
    shutil.rmtree(out, ignore_errors=True)
    if not a.keep:
        shutil.rmtree(model, ignore_errors=True)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
