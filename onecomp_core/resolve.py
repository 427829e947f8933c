"""A run's config with its components looked up by name, built once, options validated."""
from __future__ import annotations

import sys

import attrs

from .config import RunConfig, build_options, options_dict
from .errors import OnecompError
from .plugins import load_plugins
from .registry import KINDS

MAIN_EXPORTER = "compressed-tensors"
AUTO_REFINERS = ("blockptq", "globalptq")      # what --refine auto adds, strongest last, where installed


def default_projector(registry) -> str:
    """``gptq`` where its plugin is installed, else the core's ``rtn``."""
    return "gptq" if "gptq" in registry.names("projector") else "rtn"


def _unique(kind: str, names) -> None:
    seen = set()
    for n in names:
        if n in seen:
            raise OnecompError(f"{kind} {n!r} is listed twice; name each once")
        seen.add(n)


class Resolved:
    """Every component the config names, built once with its options. ``component(kind,
    name)`` builds (or returns) any other one with the run's options, e.g. the projectors and
    formats a planner chooses per module."""

    def __init__(self, run: RunConfig, plugins=None):
        self.plugins = plugins or load_plugins()
        reg = self.plugins.registry
        if run.projector is None:
            run = attrs.evolve(run, projector=default_projector(reg))
            if run.projector == "rtn" and run.planner == "uniform":
                print("onecomp: note: projector rtn (install onecomp-plugins-gptq for gptq, the default)",
                      file=sys.stderr)
        self.run = run
        self._built: dict[tuple[str, str], object] = {}
        _unique("refiner", run.refiners)
        _unique("preprocessor", run.preprocessors)
        self.planner = self.component("planner", run.planner)
        self.projectors = {run.projector: self.component("projector", run.projector)}
        self.formats = {run.format: self.component("format", run.format)}
        self.preprocessors = [self.component("preprocessor", n) for n in run.preprocessors]
        names = list(run.refiners)
        self.auto_refiners: list[str] = []     # added by --refine auto: run only where they fit
        self.auto_dropped: list[dict] = []     # added by --refine auto, then found unable to run (drop_auto)
        if run.refine == "auto":
            self.auto_refiners = [n for n in AUTO_REFINERS if n in reg.names("refiner") and n not in names]
            missing = [n for n in AUTO_REFINERS if n not in reg.names("refiner")]
            if missing:
                print(f"onecomp: note: --refine auto without {', '.join(missing)} (pip install "
                      f"{' '.join('onecomp-plugin-' + n for n in missing)})", file=sys.stderr)
            names += self.auto_refiners
        self.refiners = [self.component("refiner", n) for n in names]
        self.exporters = [self.component("exporter", n)
                          for n in dict.fromkeys((MAIN_EXPORTER, *run.exports))]
        known = set().union(*(reg.names(k) for k in KINDS if k != "model_adapter"))
        stray = sorted(set(run.options) - known)
        if stray:
            raise OnecompError(f"options given for unknown component(s) {', '.join(map(repr, stray))}; "
                               f"known: {', '.join(sorted(known))}")

    def component(self, kind: str, name: str):
        key = (kind, name)
        if key not in self._built:
            reg = self.plugins.registry
            cls = reg.get(kind, name)
            siblings = tuple(reg.get(k, name) for k in KINDS if k != kind and name in reg.names(k))
            self._built[key] = cls(build_options(kind, name, cls, self.run.component_options(name), siblings))
        return self._built[key]

    def drop_auto(self, name: str, reason: str) -> None:
        """A refiner ``--refine auto`` added cannot run here: leave it out, with one line and a
        ``refine_choice`` entry saying why."""
        self.refiners = [r for r in self.refiners if r.name != name]
        self.auto_refiners = [n for n in self.auto_refiners if n != name]
        print(f"onecomp: {name} skipped: {reason}", file=sys.stderr, flush=True)
        self.auto_dropped.append({"name": name, "run": False, "reason": reason})

    def refiners_of(self, scope: str) -> list:
        """The refiners acting at ``scope`` (layer, block, model), in config order."""
        return [r for r in self.refiners if scope in r.active_scopes()]

    def describe(self) -> dict:
        d = self.run.to_dict()
        d["resolved_options"] = {f"{kind}:{name}": options_dict(c.options) for (kind, name), c in self._built.items()}
        return d
