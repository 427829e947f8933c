"""Plugin glue: the ``autobit`` planner."""
from __future__ import annotations

import hashlib
import json
import re

import attrs
import torch

from onecomp_core.components import Planner
from onecomp_core.errors import OnecompError
from onecomp_core.hookspecs import hookimpl
from onecomp_core.model_source import cache_root
from onecomp_core.planners import excluded, scale_dtype_for
from onecomp_core.spec import LayerSpec, Plan
from onecomp_core.validators import boolean, in_range, one_of

from .budget import fit_memory_budget_bits, parse_size
from .errors import candidate_error, output_curvature
from .heatmap import allocation_png
from .ilp import smallest_budget, solve


def _int_list(lo, hi, allow_channel=False):
    def check(inst, attr, value):
        ok = isinstance(value, (list, tuple)) and value and all(
            isinstance(v, int) and not isinstance(v, bool) and (lo <= v <= hi or (allow_channel and v == -1))
            for v in value)
        if not ok:
            raise ValueError(f"option {attr.name!r} must be a non-empty list of integers in [{lo}, {hi}]"
                             f"{' or -1' if allow_channel else ''}, got {value!r}")
    return check


def _overrides(inst, attr, value):
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, dict) and set(v) <= {"bits", "group_size"}
                                              for k, v in value.items()):
        raise ValueError(f"option 'overrides' maps module patterns to {{bits, group_size}}, got {value!r}")


@attrs.define(frozen=True)
class AutoBitOptions:
    bits: tuple = attrs.field(default=(2, 3, 4, 8), converter=tuple, validator=_int_list(2, 8))
    groups: tuple = attrs.field(default=(32, 64, 128, -1), converter=tuple, validator=_int_list(1, 1 << 16, True))
    error: str = attrs.field(default="activation", validator=one_of("activation", "frobenius"))
    curvature: bool = attrs.field(default=True, validator=boolean)
    curvature_samples: int = attrs.field(default=8, validator=in_range(1, 4096))
    tie: bool = attrs.field(default=True, validator=boolean)
    overrides: dict = attrs.field(factory=dict, validator=_overrides)
    time_limit_s: float = attrs.field(default=60.0, validator=in_range(0.1, 3600))
    cache: bool = attrs.field(default=True, validator=boolean)


class AutoBit(Planner):
    """Mixed precision: for each module (or tied group) one (bits, group size) candidate, chosen
    by an integer program that minimises the predicted error under the budget."""
    name = "autobit"
    Options = AutoBitOptions

    def plan(self, ctx) -> Plan:
        run, o = ctx.run, self.options
        fmt = ctx.formats[run.format]
        names = [n for n in ctx.shapes if not excluded(n, run.exclude)]
        if not names:
            raise OnecompError("nothing to quantize: every linear matches an exclude pattern")
        sdt = scale_dtype_for(ctx.checkpoint_dtype)
        cands = [(b, g) for b in o.bits for g in o.groups]

        def spec(n, b, g):
            return LayerSpec(name=n, format=run.format, projector=run.projector, bits=b, group_size=g,
                             symmetric=run.symmetric, scale_dtype=sdt)

        allowed = {}
        for n in names:
            fixed = [v for p, v in o.overrides.items() if excluded(n, [p])]
            if fixed:
                v = fixed[0]
                allowed[n] = [(int(v.get("bits", run.bits)), int(v.get("group_size", run.group_size)))]
            else:
                allowed[n] = cands
            for b, g in allowed[n]:
                fmt.check(spec(n, b, g), ctx.shapes[n])
        units = self._units(ctx, names, allowed)
        errs = self._errors(ctx, names, allowed)
        total = sum(ctx.shapes[n][0] * ctx.shapes[n][1] for n in names)
        budget, budget_info = self._budget(ctx, total)
        E, M = [], []
        for unit in units:
            opts = allowed[unit[0]]
            E.append([sum(errs[n][i] for n in unit) for i in range(len(opts))])
            M.append([sum(fmt.bits_per_weight(spec(n, *c), ctx.shapes[n]) * ctx.shapes[n][0] * ctx.shapes[n][1]
                          for n in unit) for c in opts])
        floor = smallest_budget(M)
        if budget < floor:
            raise OnecompError(f"budget infeasible: {budget / total:.4f} bits per weight is below the smallest "
                               f"feasible {floor / total:.4f} with these candidates; raise the budget or add "
                               f"smaller candidates (autobit.bits / autobit.groups)")
        choice, solver, secs = solve(E, M, budget, o.time_limit_s)
        specs = {}
        for unit, c in zip(units, choice):
            b, g = allowed[unit[0]][c]
            for n in unit:
                specs[n] = spec(n, b, g)
        specs = {n: specs[n] for n in ctx.shapes if n in specs}
        used = sum(M[i][c] for i, c in enumerate(choice))
        info = {"budget_bits": budget, "budget_bpw": budget / total, "planned_bpw": used / total,
                "smallest_feasible_bpw": floor / total, "predicted_error": sum(E[i][c] for i, c in enumerate(choice)),
                "error_model": o.error + ("+curvature" if self.uses_curvature else ""), "solver": solver,
                "solve_seconds": secs, "units": len(units), "candidates": [list(c) for c in cands], **budget_info}
        plan = Plan(specs, planner=self.name, info=info)
        plan.artifacts["autobit_heatmap.png"] = self._heatmap(ctx, specs, fmt)
        plan.artifacts["autobit_plan.json"] = json.dumps(
            {"info": info, "modules": {n: [s.bits, s.group_size] for n, s in specs.items()}}, indent=2).encode()
        return plan

    @property
    def uses_curvature(self) -> bool:
        """The output curvature weights the activation-aware model only (Frobenius: A = B = 1)."""
        return self.options.error == "activation" and self.options.curvature

    # -- pieces -----------------------------------------------------------------------------
    def _units(self, ctx, names, allowed):
        """Decision units: modules of one input group (q/k/v, gate/up) tied when asked and
        when they share the same allowed candidates."""
        name_set = set(names)
        units, seen = [], set()
        groups = ctx.groups if self.options.tie else [[n] for n in names]
        for g in groups:
            members = [n for n in g if n in name_set]
            by_opts = {}
            for n in members:
                by_opts.setdefault(tuple(allowed[n]), []).append(n)
            for unit in by_opts.values():
                units.append(unit)
                seen.update(unit)
        units += [[n] for n in names if n not in seen]
        return units

    def _errors(self, ctx, names, allowed) -> dict:
        o = self.options
        A = ctx.input_diag() if o.error == "activation" else {}
        B = output_curvature(ctx.model_folder, ctx.calibration_ids, names, ctx.device, o.curvature_samples) \
            if self.uses_curvature else {}
        key = hashlib.sha1(json.dumps([str(ctx.model_folder), o.error, self.uses_curvature, o.curvature_samples,
                                       ctx.run.symmetric,
                                       sorted({c for n in names for c in allowed[n]}),
                                       ctx.run.calibration.__repr__()], default=str).encode()).hexdigest()[:16]
        path = cache_root() / "autobit" / f"{key}.pt"
        cached = torch.load(path) if o.cache and path.is_file() else {}
        out = {}
        for n in names:
            W = None
            out[n] = []
            for b, g in allowed[n]:
                k = f"{n}|{b}|{g}"
                if k not in cached:
                    W = ctx.weight(n) if W is None else W
                    cached[k] = candidate_error(W, b, g, ctx.run.symmetric, A.get(n), B.get(n))
                out[n].append(cached[k])
        if o.cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(cached, tmp)
            tmp.replace(path)
        return out

    def _budget(self, ctx, total):
        run = ctx.run
        given = [k for k in ("target_bpw", "budget_bytes", "fit_memory") if getattr(run, k) is not None]
        if len(given) != 1:
            raise OnecompError("planner 'autobit' needs exactly one budget: --target-bpw X, --budget-bytes SIZE "
                               f"or --fit-memory SIZE (given: {', '.join(given) or 'none'})")
        if run.target_bpw is not None:
            return run.target_bpw * total, {"budget_from": "target_bpw"}
        if run.budget_bytes is not None:
            return parse_size(run.budget_bytes) * 8.0, {"budget_from": "budget_bytes"}
        from onecomp_core.skeleton import load_config
        config = load_config(ctx.model_folder)
        from onecomp_core.lazy_weights import LazyWeights
        lw = LazyWeights(ctx.model_folder)
        all_params = sum(lw.numel(k) for k in lw.keys())
        bits, over = fit_memory_budget_bits(parse_size(run.fit_memory), config, all_params - total,
                                            run.context, run.batch)
        return bits, {"budget_from": "fit_memory", "overhead_bytes": over}

    def _heatmap(self, ctx, specs, fmt):
        rows, kinds = {}, []
        for n in ctx.shapes:
            m = re.match(r"(.*\.\d+)\.(.+)$", n)
            block, kind = (m.group(1), m.group(2)) if m else ("", n)
            if kind not in kinds:
                kinds.append(kind)
            s = specs.get(n)
            rows.setdefault(block, {})[kind] = fmt.bits_per_weight(s, ctx.shapes[n]) if s else None
        return allocation_png([[r.get(k) for k in kinds] for r in rows.values()])


@hookimpl
def onecomp_register_planners(registry):
    registry.add_planner(AutoBit)
