"""The run report, as JSON and Markdown, written into the output folder."""
from __future__ import annotations

import resource
import sys

import torch


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def peak_gpu_mb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def markdown(report: dict) -> str:
    lines = ["# onecomp run report", ""]
    s = report["summary"]
    for k in ("model", "format", "projector", "preprocessors", "refiners", "planner", "bits", "group_size", "symmetric",
              "bpw", "quantized_params", "wall_seconds", "peak_rss_mb", "peak_gpu_mb", "resumed_from_block"):
        if k in s:
            lines.append(f"- **{k}**: {s[k]}")
    if report.get("refine"):
        lines += ["", "## Model refiners", "", "| refiner | modules | held-out KL before | after | kept |", "|---|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['modules']} | {r['before']:.4g} | {r['after']:.4g} | {r['kept']} |"
                  for r in report["refine"]]
    if report.get("evaluation"):
        lines += ["", "## Evaluation", ""]
        lines += [f"- **{k}**: {v}" for k, v in report["evaluation"].items()]
    lines += ["", "## Stages", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in report["stages"].items()]
    lines += ["", "## Layers", "", "| module | bits | group | projector | bpw | relative output error | seconds |",
              "|---|---|---|---|---|---|---|"]
    for name, li in report["layers"].items():
        lines.append(f"| {name} | {li['bits']} | {li['group_size']} | {li['projector']} | {li['bpw']:.3f} | "
                     f"{li['rel_error']:.3e} | {li['seconds']:.2f} |")
    return "\n".join(lines) + "\n"
