"""The output folder's ``README.md``: a model card saying what was done to which model, what it
measured, how big it is, and how to load it in transformers, vLLM and llama.cpp (only the ways
this checkpoint supports)."""
from __future__ import annotations

import json
from pathlib import Path


def _config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _plain_transformers(config: dict) -> bool:
    """Whether config.json carries a quantization_config that transformers' compressed-tensors
    integration reads (one format with a compressed-tensors scheme, no online transform)."""
    return "quantization_config" in config and not config.get("onecomp_online_transforms")


def _asymmetric_note(config: dict) -> str:
    """What a user loading this checkpoint in plain transformers should know about its zero points."""
    groups = config.get("quantization_config", {}).get("config_groups", {})
    if all(g["weights"].get("symmetric", True) for g in groups.values()):
        return ""
    if len(groups) == 1:
        return (" (asymmetric zero points: the config asks transformers to dequantize at load, so it holds dense "
                "weights in the scales' dtype; tested with transformers 5.24 and compressed-tensors 0.20)")
    return (" (asymmetric zero points under several schemes: transformers 5.24 decompresses every module with the "
            "first scheme and stops with a size mismatch, and its compressed path misreads packed zero points; "
            "earlier versions (5.17) load it; onecomp's loader always does)")


def model_card(report: dict, folder: Path) -> str:
    s, ev = report.get("summary", {}), report.get("evaluation") or {}
    name = Path(str(folder)).name or "model"
    lines = [f"# {name}", "", f"A low-bit version of `{s.get('model')}` made with onecomp.", "", "## What was done", ""]
    if s.get("planner") and s.get("planner") != "uniform":
        lines.append(f"- plan: `{s['planner']}` (mixed precision; see report.html for each module's bits)")
    grid = "symmetric" if s.get("symmetric") else "asymmetric"
    if s.get("format") == "uniform":
        group = "per channel" if s.get("group_size") == -1 else f"group {s.get('group_size')}"
        lines.append(f"- format: uniform {s.get('bits')}-bit integers, {group}, {grid}")
    else:
        lines.append(f"- format: `{s.get('format')}`")
    lines.append(f"- projector: `{s.get('projector')}`")
    for key, label in (("preprocessors", "transforms"), ("refiners", "refiners")):
        if s.get(key):
            lines.append(f"- {label}: {', '.join(f'`{x}`' for x in s[key])}")
    kept = [r["name"] for r in report.get("refine", []) if r.get("kept")]
    dropped = [r["name"] for r in report.get("refine", []) if not r.get("kept")]
    if kept or dropped:
        lines.append(f"- stages kept after the pivot: {', '.join(kept) or 'none'}"
                     + (f"; discarded (held-out KL did not fall): {', '.join(dropped)}" if dropped else ""))
    lines += ["", "## Measured", "", f"- bits per weight of the quantized linears: {s.get('bpw')}"]
    if s.get("checkpoint_mb") is not None:
        ratio = f" ({s['size_ratio']:.1%} of the source's {s['source_mb']} MB)" if s.get("size_ratio") else ""
        lines.append(f"- checkpoint size: {s['checkpoint_mb']} MB{ratio}")
    if ev.get("ppl") is not None:
        ref = f" (full precision: {ev['ppl_ref']:.3f})" if ev.get("ppl_ref") is not None else ""
        lines.append(f"- perplexity: {ev['ppl']:.3f}{ref} on {ev.get('tokens')} tokens of the evaluation text")
        if ev.get("kl") is not None:
            lines.append(f"- mean KL to the full-precision model per token: {ev['kl']:.4f}")
    else:
        lines.append("- not evaluated in this run: `onecomp eval DIR --ref MODEL --text FILE` measures it")
    from .report import lm_eval_rows
    for task, metric, value, ref in lm_eval_rows(report):
        lines.append(f"- lm-eval {task} {metric}: {value:.4g}" + (f" (full precision: {ref:.4g})" if ref != "" else ""))
    lines += ["", "## Load it", "", "onecomp (every format):", "", "```python",
              "import onecomp_core", f'model = onecomp_core.load_quantized("{folder}")', "```", ""]
    config = _config(Path(folder))
    if _plain_transformers(config):
        note = _asymmetric_note(config)
        lines += [f"transformers (with `compressed-tensors` installed){note}:", "", "```python",
                  "from transformers import AutoModelForCausalLM",
                  f'model = AutoModelForCausalLM.from_pretrained("{folder}")', "```", "",
                  "vLLM (reads compressed-tensors checkpoints):", "", "```bash", f"vllm serve {folder}", "```", ""]
    else:
        lines += ["This format has no compressed-tensors scheme, so plain transformers and vLLM cannot load it; "
                  "use onecomp's loader above.", ""]
    if "gguf" in (report.get("exports") or {}):
        lines += ["llama.cpp:", "", "```bash", f"llama-cli -m {folder}/model.gguf -p \"Hello\"", "```", ""]
    else:
        lines += ["llama.cpp: not exported; re-run with `--export gguf` (4-bit and 8-bit uniform grids).", ""]
    lines += ["Details: `report.html` (plots), `report.md` and `report.json` in this folder."]
    return "\n".join(lines) + "\n"
