"""The run report, as JSON and Markdown, written into the output folder."""
from __future__ import annotations

import resource
import sys

import torch


_PEAK_BEFORE_RESET = 0.0      # the process's peak before the last stage reset its high-water mark


def _kernel_peak_mb() -> float:
    """The kernel's high-water mark of this process's resident size: Linux's VmHWM, its own
    memory's (getrusage's ru_maxrss also counts the parent's resident size at the fork of a
    process started by a large one, e.g. a bench script holding a model); ru_maxrss elsewhere."""
    hwm = _status_kb("VmHWM")
    if hwm is not None:
        return hwm / 1024
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_mb() -> float:
    """The process's peak resident size so far (across stage resets)."""
    return max(_PEAK_BEFORE_RESET, _kernel_peak_mb())


def reset_stage_peak() -> bool:
    """Start measuring a stage's own peak: the kernel's high-water mark is set back to the
    resident size now (Linux, /proc/self/clear_refs), the process's peak so far kept aside.
    -> whether it could (elsewhere the stage's peak is the process's)."""
    global _PEAK_BEFORE_RESET
    peak = peak_rss_mb()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    _PEAK_BEFORE_RESET = peak
    return True


def stage_peak_mb() -> float:
    """The peak resident size since the last :func:`reset_stage_peak` (the process's elsewhere)."""
    return _kernel_peak_mb()


def rss_mb() -> float:
    """The resident set size now (Linux; the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return peak_rss_mb()


def rss_bytes() -> int:
    return int(rss_mb() * 2**20)


def peak_gpu_mb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def lm_eval_rows(report: dict) -> list[tuple]:
    """(task, metric, this model's value, the reference's or '') of the report's lm-eval scores."""
    scores = report.get("lm_eval") or {}
    ref = scores.get("reference", {})
    return [(t, m, v, ref.get(t, {}).get(m, "")) for t, ms in scores.get("model", {}).items() for m, v in ms.items()]


def markdown(report: dict) -> str:
    lines = ["# onecomp run report", ""]
    s = report["summary"]
    for k in ("model", "format", "projector", "preprocessors", "refiners", "planner", "bits", "group_size", "symmetric",
              "bpw", "quantized_params", "checkpoint_mb", "source_mb", "size_ratio", "stage", "wall_seconds", "peak_rss_mb", "peak_gpu_mb", "resumed_from_block"):
        if k in s:
            lines.append(f"- **{k}**: {s[k]}")
    if report.get("disk"):
        d = report["disk"]
        lines.append(f"- **disk**: {d['need_mb']} MB predicted at the peak (checkpoint {d['checkpoint_mb']} MB), "
                     f"{d['free_mb']} MB free under {d['where']} when the run started")
    predicted = {d["name"]: d for d in report.get("refine_choice", [])}
    if report.get("refine"):
        lines += ["", "## Model refiners", "", "| refiner | modules | held-out KL before | after | kept | seconds | "
                  "predicted peak MB | peak RSS MB so far |", "|---|---|---|---|---|---|---|---|"]
        for r in report["refine"]:
            kept = "skipped" if r.get("skipped") else r["kept"]
            pred = predicted.get(r["name"], {}).get("predicted_peak_mb", "")
            lines.append(f"| {r['name']} | {r['modules']} | {r['before']:.4g} | {r['after']:.4g} | {kept} | "
                         f"{r.get('seconds', '')} | {pred} | {r.get('peak_rss_mb', '')} |")
    if report.get("refine_choice"):
        lines += ["", "## Refine choice (--refine auto)", "", "| refiner | runs | why | predicted peak MB | predicted s |",
                  "|---|---|---|---|---|"]
        lines += [f"| {d['name']} | {d['run']} | {d['reason']} | {d.get('predicted_peak_mb', '')} | "
                  f"{d.get('predicted_seconds', '')} |" for d in report["refine_choice"]]
    if report.get("evaluation"):
        lines += ["", "## Evaluation", ""]
        lines += [f"- **{k}**: {v}" for k, v in report["evaluation"].items()]
    if report.get("lm_eval"):
        lines += ["", "## lm-eval", "", "| task | metric | this model | reference |", "|---|---|---|---|"]
        lines += [f"| {t} | {m} | {v:.4g} | {r if r == '' else format(r, '.4g')} |" for t, m, v, r in lm_eval_rows(report)]
    lines += ["", "## Stages", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in report["stages"].items()]
    lines += ["", "## Layers", "", "| module | bits | group | projector | bpw | relative output error | seconds |",
              "|---|---|---|---|---|---|---|"]
    for name, li in report["layers"].items():
        lines.append(f"| {name} | {li['bits']} | {li['group_size']} | {li['projector']} | {li['bpw']:.3f} | "
                     f"{li['rel_error']:.3e} | {li['seconds']:.2f} |")
    return "\n".join(lines) + "\n"


def write_reports(folder, report: dict) -> None:
    """report.json, report.md, report.html and the model card README.md into ``folder`` (each
    written atomically)."""
    from pathlib import Path

    from .model_card import model_card
    from .report_html import html_report
    from .store import atomic_json, atomic_write_bytes
    folder = Path(folder)
    atomic_json(folder / "report.json", report)
    atomic_write_bytes(folder / "report.md", markdown(report).encode())
    atomic_write_bytes(folder / "report.html", html_report(report).encode())
    atomic_write_bytes(folder / "README.md", model_card(report, folder).encode())
