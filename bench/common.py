"""Shared helpers of the bench scripts: run one quantization in a subprocess (so that its peak
RSS is its own) and collect the numbers from its report."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CALIB = ROOT / "data" / "enwiki_calib.txt"
EVAL = ROOT / "data" / "enwiki_eval.txt"


def quantize_and_measure(model: str, flags: list[str], eval_tokens: int = 16384, calibration: Path = CALIB,
                         keep_report: Path | None = None, python: str = sys.executable,
                         keep_out: Path | None = None, launcher: list[str] | None = None,
                         env: dict | None = None) -> dict:
    """One `onecomp quantize ... --eval-text` run -> its summary numbers. ``keep_report``: also
    copy the run's report.json there (per-module errors and times); ``python``: the interpreter
    (of another environment, e.g. an older onecomp) that runs it; ``keep_out``: write the
    checkpoint there (kept) instead of a temporary folder; ``launcher``: what runs the onecomp
    command instead of ``python -m onecomp_core.cli`` (e.g. torchrun); ``env``: extra environment."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(keep_out) if keep_out is not None else Path(tmp) / "q"
        cfg = Path(tmp) / "c.json"
        cfg.write_text(json.dumps({"eval_tokens": eval_tokens}))
        cmd = [*(launcher or [python, "-m", "onecomp_core.cli"]), "quantize", model, "--out", str(out),
               "--calibration", str(calibration), "--eval-text", str(EVAL), "--config", str(cfg), *flags]
        # run in a neutral folder: `python -m` puts the working directory first on sys.path, where a
        # checkout's onecomp_core would shadow the interpreter's own installation
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp,
                              env={**os.environ, "ONECOMP_PROGRESS": "0", **(env or {})})
        if proc.returncode != 0:
            return {"flags": flags, "error": proc.stderr.strip().splitlines()[-1:]}
        rep = json.loads((out / "report.json").read_text())
        if keep_report is not None:
            Path(keep_report).parent.mkdir(parents=True, exist_ok=True)
            Path(keep_report).write_text(json.dumps(rep, indent=1))
    s, e = rep["summary"], rep["evaluation"]
    return {"flags": " ".join(flags), "bpw": s["bpw"], "plan": rep.get("plan_info", {}).get("planned_bpw"), "ppl": round(e["ppl"], 3), "ppl_fp": round(e["ppl_ref"], 3),
            "kl": round(e["kl"], 4), "wall_s": s["wall_seconds"], "layerwise_s": round(rep["stages"]["layerwise"], 1),
            "s_per_block": s["seconds_per_block"],
            "s_per_layer": round(sum(li["seconds"] for li in rep["layers"].values()) / max(len(rep["layers"]), 1), 3), "peak_rss_mb": s["peak_rss_mb"],
            "peak_rss_mb_with_eval": s.get("peak_rss_mb_with_eval"),
            "stage_peak_rss_mb": {k: v.get("stage_peak_rss_mb") for k, v in rep.get("stage_memory", {}).items()},
            "stage_start_rss_mb": {k: v.get("start_rss_mb") for k, v in rep.get("stage_memory", {}).items()},
            "preprocessors": rep.get("preprocessors", [])}


def refine_and_measure(src: Path, out: Path, refiners: list[str], eval_tokens: int = 16384,
                       extra: list[str] = ()) -> dict:
    """Copy the checkpoint ``src`` to ``out``, run `onecomp refine out --refiner ...` on it, then
    `onecomp eval out --ref <its FP model>` -> the same summary numbers as quantize_and_measure
    (seconds and peak RSS of the refine run alone; calibration as the checkpoint's run had it)."""
    import shutil
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out)
    env = {**os.environ, "ONECOMP_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "onecomp_core.cli", "refine", str(out),
           *[f for r in refiners for f in ("--refiner", r)], *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=out.parent, env=env)
    if proc.returncode != 0:
        return {"refiners": refiners, "error": proc.stderr.strip().splitlines()[-1:]}
    log = [line for line in proc.stdout.splitlines() if line.startswith("[")]    # refiners' own lines
    rep = json.loads((out / "report.json").read_text())
    ref = rep["summary"]["source_folder"]
    proc = subprocess.run([sys.executable, "-m", "onecomp_core.cli", "eval", str(out), "--ref", ref,
                           "--text", str(EVAL), "--max-tokens", str(eval_tokens), "--json"],
                          capture_output=True, text=True, cwd=out.parent, env=env)
    if proc.returncode != 0:
        return {"refiners": refiners, "error": proc.stderr.strip().splitlines()[-1:]}
    e = json.loads(proc.stdout.strip().splitlines()[-1])
    stages = rep.get("refine", [])
    return {"flags": "refine " + " ".join(refiners), "bpw": rep["summary"]["bpw"], "ppl": round(e["ppl"], 3),
            "ppl_fp": round(e["ppl_ref"], 3), "kl": round(e["kl"], 4),
            "wall_s": round(sum(st["seconds"] for st in stages), 1),
            "peak_rss_mb": max((st["peak_rss_mb"] for st in stages), default=None),
            "stage_table": stages, "refine_choice": rep.get("refine_choice"), "log": log}
