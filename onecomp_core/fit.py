"""The resource-adaptive refine choice (``--refine auto``): before each refiner that
``--refine auto`` added starts, its estimate (``Refiner.estimate``) is compared with
``--max-memory`` (default: the machine's RAM, or the GPU's memory on CUDA) and with what is left
of ``--time-budget``; it runs or is skipped with one line saying why. ``--max-memory`` below
what the layer-wise pass itself needs stops the run before any work; below what a refiner the
config names needs, before that refiner starts (block refiners: before any work; model
refiners: after the pivot is saved)."""
from __future__ import annotations

import sys
import time

from .errors import OnecompError
from .resources import human_bytes, human_seconds, memory_budget, parse_duration


class OverBudget(OnecompError):
    """A refiner the config names needs more than the explicit ``--max-memory``."""


class RefineChoice:
    def __init__(self, run, auto_refiners, device, t_start: float):
        self.auto = set(auto_refiners)
        self.explicit = run.max_memory is not None
        self.budget = memory_budget(run.max_memory, device)
        self.deadline = t_start + parse_duration(run.time_budget) if run.time_budget is not None else None
        self.decisions: list[dict] = []

    def check_pivot(self, need: int) -> None:
        """The layer-wise pass's own estimated peak against an explicit ``--max-memory``."""
        if self.explicit and need > self.budget:
            raise OnecompError(f"--max-memory {human_bytes(self.budget)} is below what the layer-wise pass needs "
                               f"(~{human_bytes(need)}): raise it, or lower --num-samples / --seq-len")

    def allow(self, refiner, estimate: dict | None, base: int = 0, floor: int = 0) -> bool:
        """Run ``refiner``? (``decide``'s verdict.)"""
        return self.decide(refiner, estimate, base, floor)["run"]

    def decide(self, refiner, estimate: dict | None, base: int = 0, floor: int = 0) -> dict:
        """Whether ``refiner`` runs and why (the dict recorded in the report). Those ``--refine
        auto`` added run only if the estimate, plus ``base`` bytes already needed, fits. Refiners
        named in the config run (their estimate is recorded), except that one whose estimate
        exceeds an explicit ``--max-memory`` stops the run with one line before it starts (the time budget stays advisory for them: an overrun loses nothing).
        The estimate's ``seconds`` may be a zero-argument callable (a timed probe that itself needs
        the refiner's memory): it is called only when the memory fits or the refiner runs anyway.
        ``floor``: the process's peak so far, reached in work this step repeats (the refine stage
        judges each candidate as it has just judged the checkpoint); a stage's measured peak is
        the process's, so the predicted one is the larger of the two, while the verdict weighs the
        refiner's own need alone."""
        d = {"name": refiner.name, "run": True, "reason": "no estimate"}
        if estimate is not None:
            mem, secs = base + int(estimate.get("memory_bytes", 0)), estimate.get("seconds")
            auto = refiner.name in self.auto
            if mem > self.budget and not auto and self.explicit:
                raise OverBudget(f"{refiner.name} needs ~{human_bytes(mem)}, over --max-memory "
                                 f"{human_bytes(self.budget)}: raise --max-memory or drop --refiner {refiner.name}")
            if callable(secs):                       # the probe would need the memory that does not fit
                secs = secs() if mem <= self.budget or not auto else None
            d.update(predicted_peak_mb=round(max(mem, floor) / 2**20, 1),
                     predicted_seconds=None if secs is None else round(secs, 1))
            if floor > mem:
                d["predicted_refiner_mb"] = round(mem / 2**20, 1)
            d["reason"] = f"~{human_bytes(mem)}" + ("" if secs is None else f", ~{human_seconds(secs)}")
            if auto and mem > self.budget:
                d.update(run=False, reason=f"needs ~{human_bytes(mem)}, max-memory {human_bytes(self.budget)}")
            elif (auto and self.deadline is not None and secs is not None
                  and time.time() + secs > self.deadline):
                left = max(0.0, self.deadline - time.time())
                d.update(run=False, reason=f"needs ~{human_seconds(secs)}, {human_seconds(left)} left of the time budget")
        if refiner.name not in self.auto:
            d["reason"] = f"named in the config ({d['reason']})"
        verdict = "runs" if d["run"] else "skipped"
        print(f"onecomp: {refiner.name} {verdict}: {d['reason']}", file=sys.stderr, flush=True)
        self.decisions.append(d)
        return d
