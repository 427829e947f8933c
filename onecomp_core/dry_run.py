"""A dry run (``--dry-run``): the run up to its plan and the refiners' choice (model opened,
calibration tokenised, preprocessors fitted, the plan made and checked, block refiners
estimated), the first block's layer-wise pass run and thrown away to time it, then a report of
what the run would do, without writing the output or its work folder. Caches (calibration
tokens, AutoBit's candidate errors) are kept as a real run keeps them."""
from __future__ import annotations

from collections import Counter

from .report import peak_rss_mb
from .resources import human_bytes, human_seconds, memory_budget, parse_duration


def planned_bpw(plan, formats, shapes) -> float:
    """Σ_m bpw_m · |W_m| / Σ_m |W_m|, each module's bits per weight as its format accounts them."""
    params = sum(shapes[n][0] * shapes[n][1] for n in plan.specs)
    bits = sum(formats[s.format].bits_per_weight(s, shapes[n]) * shapes[n][0] * shapes[n][1]
               for n, s in plan.specs.items())
    return bits / max(params, 1)


def spec_label(spec) -> str:
    """One plan entry in words: ``gptq uniform 4-bit g128``, ``dbf dbf 1.5 bpw`` (projector, format, grid)."""
    if "bpw" in spec.options:
        grid = f"{spec.format} {spec.options['bpw']} bpw"
    else:
        grid = f"{spec.format} {spec.bits}-bit " + (f"g{spec.group_size}" if (spec.group_size or 0) > 0 else "per-channel")
    return f"{spec.projector} {grid}"


def dry_run_report(runner, wall: float) -> dict:
    """What the run would do, from a runner stopped after its plan stage; printed in a few lines."""
    run, res = runner.run_cfg, runner.res
    plan, shapes = runner.plan_, runner.shapes
    need = None if runner.refine_only else runner.layerwise_need_bytes()
    secs = getattr(runner, "block_timing", None)
    budget = memory_budget(run.max_memory, runner.device)
    counts = Counter(spec_label(s) for s in plan.specs.values())
    choice = getattr(runner, "choice", None)
    later = [] if runner.refine_only else [r.name for r in runner.stage_refiners()]   # refine only: estimated
    summary = {"model": str(run.model), "out": str(run.out), "outlook": runner.outlook[0],
               "modules": len(plan.specs), "bpw": round(planned_bpw(plan, res.formats, shapes), 4),
               "quantized_params": sum(shapes[n][0] * shapes[n][1] for n in plan.specs),
               "blocks": len(runner.sk.blocks), "resumes_after_block": runner.start, "device": str(runner.device),
               "predicted_layerwise_peak_mb": None if need is None else round(need / 2**20, 1),
               "max_memory_mb": round(budget / 2**20, 1), "max_memory_explicit": run.max_memory is not None,
               "time_budget_s": None if run.time_budget is None else parse_duration(run.time_budget),
               "streams_on_disk": bool(need is not None and runner.streams_spill(*runner.layerwise_parts())),
               # the first block to do, run for real and thrown away: its seconds, times the blocks left
               "timed_block_seconds": None if secs is None else round(secs, 2),
               "predicted_layerwise_seconds": None if secs is None else
               round(secs * (len(runner.sk.blocks) - runner.start), 1),
               "wall_seconds": round(wall, 2), "peak_rss_mb": round(peak_rss_mb(), 1)}
    report = {"dry_run": True, "summary": summary, "outlook": runner.outlook[1], "plan_counts": dict(counts),
              "plan": {n: s.to_dict() for n, s in plan.specs.items()}, "plan_info": plan.info,
              "preprocessors": [{"name": n, **t.describe()} for n, t in runner.transforms],
              "refine_choice": choice.decisions if choice is not None else [], "disk": runner.disk,
              "later_refiners": later, "stages": runner.stages, "config": res.describe()}
    return report


def dry_run_lines(report: dict) -> list[str]:
    """The dry run in words, for the command line."""
    s = report["summary"]
    plan = ", ".join(f"{n} x {label}" for label, n in sorted(report["plan_counts"].items(), key=lambda kv: -kv[1]))
    lines = [f"dry run, nothing written: {s['model']} -> {s['out']}: {report['outlook']}",
             f"plan: {s['modules']} modules in {s['blocks']} blocks at {s['bpw']} bits per weight ({plan})"]
    if s["predicted_layerwise_peak_mb"] is not None:
        fits = "fits" if s["predicted_layerwise_peak_mb"] <= s["max_memory_mb"] else "over"
        which = "--max-memory" if s["max_memory_explicit"] else "this machine's memory"
        lines.append(f"layer-wise pass: ~{human_bytes(s['predicted_layerwise_peak_mb'] * 2**20)} predicted peak, "
                     f"{fits} {which} ({human_bytes(s['max_memory_mb'] * 2**20)})"
                     + ("; the streams go to disk" if s["streams_on_disk"] else ""))
    if s["timed_block_seconds"] is not None:
        todo, secs = s["blocks"] - s["resumes_after_block"], s["predicted_layerwise_seconds"]
        share = "" if s["time_budget_s"] is None else \
            f", {100 * secs / s['time_budget_s']:.0f}% of --time-budget {human_seconds(s['time_budget_s'])}"
        lines.append(f"layer-wise time: ~{human_seconds(secs)} for {todo} blocks (block {s['resumes_after_block']} "
                     f"run and thrown away: {s['timed_block_seconds']} s){share}")
    mib = lambda x: human_bytes(x * 2**20)
    d = report["disk"]
    lines.append(f"disk: ~{mib(d['need_mb'])} at the peak (checkpoint ~{mib(d['checkpoint_mb'])}), "
                 f"{mib(d['free_mb'])} free under {d['where']}")
    if report["preprocessors"]:
        lines.append(f"preprocessors fitted (not saved): {', '.join(p['name'] for p in report['preprocessors'])}")
    for d in report["refine_choice"]:
        lines.append(f"{d['name']} {'runs' if d['run'] else 'skipped'}: {d['reason']}")
    if report["later_refiners"]:
        lines.append(f"then {', '.join(report['later_refiners'])}: estimated when the refine stage starts "
                     f"(after the pivot is saved)")
    lines.append(f"the dry run took {s['wall_seconds']} s, peak RSS {s['peak_rss_mb']} MiB")
    return lines
