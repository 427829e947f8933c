"""Plugin glue: the ``autobit`` planner."""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor

import attrs
import torch

from onecomp_core.sdk import (LayerSpec, OnecompError, Plan, Planner, boolean, cache_root, excluded, hookimpl,
                              in_range, one_of, release_memory, scale_dtype_for, tensor_digest, weights_digest)

from .budget import fit_memory_budget_bits, parse_size
from .errors import conditional_variances, output_curvature, row_errors, rtn_weight, total_error
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
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, dict) and v and
                                              (set(v) <= {"bits", "group_size"} or set(v) == {"bpw"})
                                              for k, v in value.items()):
        raise ValueError(f"option 'overrides' maps module patterns to {{bits, group_size}} or {{bpw}} "
                         f"(a binary-factor choice), got {value!r}")


def _bpw_list(inst, attr, value):
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0.1 <= v <= 16 for v in value):
        raise ValueError(f"option 'binary' must be a list of bits-per-weight targets in [0.1, 16], got {value!r}")


# a candidate: ("int", bits, group_size) on the run's grid format, or ("bin", bpw) in the
# binary-factor format ``binary_format`` (its projector has the same name)
def _label(c) -> str:
    return f"{c[1]}|{c[2]}" if c[0] == "int" else f"{c[0]}{c[1]}"


@attrs.define(frozen=True)
class AutoBitOptions:
    bits: tuple = attrs.field(default=(2, 3, 4, 8), converter=tuple, validator=_int_list(2, 8))
    groups: tuple = attrs.field(default=(32, 64, 128, -1), converter=tuple, validator=_int_list(1, 1 << 16, True))
    error: str = attrs.field(default="auto", validator=one_of("auto", "activation", "conditional", "frobenius"))
    curvature: bool = attrs.field(default=True, validator=boolean)
    curvature_samples: int = attrs.field(default=8, validator=in_range(1, 4096))
    fisher: str = attrs.field(default="true", validator=one_of("empirical", "true"))
    tie: bool = attrs.field(default=True, validator=boolean)
    overrides: dict = attrs.field(factory=dict, validator=_overrides)
    time_limit_s: float = attrs.field(default=60.0, validator=in_range(0.1, 3600))
    cache: bool = attrs.field(default=True, validator=boolean)
    workers: int = attrs.field(default=0, validator=in_range(0, 256))
    binary: tuple = attrs.field(default=(), converter=tuple, validator=_bpw_list)
    binary_format: str = attrs.field(default="dbf")
    binary_iters: int = attrs.field(default=8, validator=in_range(0, 10_000))


class AutoBit(Planner):
    """Mixed precision: for each module (or tied group) one (bits, group size) candidate, chosen
    by an integer program that minimises the predicted error under the budget."""
    name = "autobit"
    Options = AutoBitOptions

    def plan(self, ctx) -> Plan:
        if self.options.error == "auto":
            self.options = attrs.evolve(self.options, error="conditional" if self._gptq_like(ctx) else "activation")
        run, o = ctx.run, self.options
        fmt = ctx.formats[run.format]
        if getattr(fmt, "takes_bpw", False):
            raise OnecompError(f"planner 'autobit' chooses grids of a uniform format, not {run.format!r}; keep "
                               f"--format uniform and add binary-factor candidates with autobit.binary=[1.0, 1.5] "
                               f"(autobit.binary_format={run.format!r})")
        names = [n for n in ctx.shapes if not excluded(n, run.exclude)]
        if not names:
            raise OnecompError("nothing to quantize: every linear matches an exclude pattern")
        sdt = scale_dtype_for(ctx.checkpoint_dtype)
        cands = [("int", b, g) for b in o.bits for g in o.groups] + [("bin", float(x)) for x in o.binary]

        def spec(n, c):
            if c[0] == "int":
                return LayerSpec(name=n, format=run.format, projector=run.projector, bits=c[1], group_size=c[2],
                                 symmetric=run.symmetric, scale_dtype=sdt)
            return LayerSpec(name=n, format=o.binary_format, projector=o.binary_format, bits=run.bits,
                             group_size=run.group_size, symmetric=run.symmetric, scale_dtype=sdt,
                             options={"bpw": c[1]})

        def format_of(s):
            if s.format not in ctx.formats:            # a binary-factor candidate's format, built once
                ctx.formats[s.format] = self._binary_component(ctx, "format")
            return ctx.formats[s.format]

        def fits(n, c):
            s = spec(n, c)
            f = format_of(s)                           # a missing plugin is an error, not a misfit
            try:
                f.check(s, ctx.shapes[n])
                return True
            except (OnecompError, ValueError):
                if c[0] == "int":
                    raise
                return False          # a bpw too small for a rank-1 factorisation of this module

        allowed = {}
        for n in names:
            fixed = [v for p, v in o.overrides.items() if excluded(n, [p])]
            if fixed:
                v = fixed[0]
                c = ("bin", float(v["bpw"])) if "bpw" in v else \
                    ("int", int(v.get("bits", run.bits)), int(v.get("group_size", run.group_size)))
                s = spec(n, c)
                format_of(s).check(s, ctx.shapes[n])
                allowed[n] = [c]
            else:
                allowed[n] = [c for c in cands if fits(n, c)]
        units = self._units(ctx, names, allowed)
        total = sum(ctx.shapes[n][0] * ctx.shapes[n][1] for n in names)
        budget, budget_info = self._budget(ctx, total)
        M = [[sum(self._bits(ctx, spec(n, c)) * ctx.shapes[n][0] * ctx.shapes[n][1] for n in unit) for c in allowed[unit[0]]]
             for unit in units]
        floor = smallest_budget(M)
        if budget < floor:
            raise OnecompError(f"budget infeasible: {budget / total:.4f} bits per weight is below the smallest "
                               f"feasible {floor / total:.4f} with these candidates; raise the budget or add "
                               f"smaller candidates (autobit.bits / autobit.groups / autobit.binary)")
        ceiling = sum(max(row) for row in M)
        if budget >= ceiling:
            print(f"onecomp: note: the budget, {budget / total:.4f} bits per weight, reaches the largest candidates "
                  f"({ceiling / total:.4f}): the plan gives every module its largest candidate; add larger candidates "
                  f"(autobit.bits / autobit.groups) to use more", file=sys.stderr)
        rows, B = self._errors(ctx, names, allowed, spec)
        E = [[sum(total_error(rows[n][i], B.get(n)) for n in unit) for i in range(len(allowed[unit[0]]))]
             for unit in units]
        choice, solver, secs = solve(E, M, budget, o.time_limit_s)
        specs = {}
        for unit, c in zip(units, choice):
            for n in unit:
                specs[n] = spec(n, allowed[unit[0]][c])
        specs = {n: specs[n] for n in ctx.shapes if n in specs}
        used = sum(M[i][c] for i, c in enumerate(choice))
        info = {"budget_bits": budget, "budget_bpw": budget / total, "planned_bpw": used / total,
                "smallest_feasible_bpw": floor / total, "predicted_error": sum(E[i][c] for i, c in enumerate(choice)),
                "error_model": o.error + ("+curvature" if self.uses_curvature else ""), "solver": solver,
                "solve_seconds": secs, "units": len(units),
                "candidates": [list(c[1:]) if c[0] == "int" else {o.binary_format: c[1]} for c in cands],
                **budget_info}
        plan = Plan(specs, planner=self.name, info=info)
        plan.artifacts["autobit_heatmap.png"] = self._heatmap(ctx, specs)
        plan.artifacts["autobit_plan.json"] = json.dumps(
            {"info": info, "modules": {n: [s.bits, s.group_size] if "bpw" not in s.options else
                                       {s.format: s.options["bpw"]} for n, s in specs.items()}}, indent=2).encode()
        return plan

    def _bits(self, ctx, s) -> float:
        return ctx.formats[s.format].bits_per_weight(s, ctx.shapes[s.name])

    def _binary_component(self, ctx, kind):
        if ctx.make is None:
            raise OnecompError("autobit.binary needs a planner context that can build components (ctx.make)")
        try:
            return ctx.make(kind, self.options.binary_format)
        except OnecompError as e:
            raise OnecompError(f"autobit.binary_format: {e}") from None

    @property
    def uses_curvature(self) -> bool:
        """The output curvature weights the activation-aware models only (Frobenius: A = B = 1)."""
        return self.options.error != "frobenius" and self.options.curvature

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

    def _errors(self, ctx, names, allowed, spec):
        """-> (rows, B): rows[n][i] the (out,) row errors sum_j dW_ij^2 A_jj of module n's i-th
        candidate under its proxy, B[n] the output curvature ({} when off). Cached per model,
        error model and calibration."""
        o = self.options
        binary = any(c[0] == "bin" for n in names for c in allowed[n])
        proxy = self._binary_proxy(ctx) if binary else None
        gptq_order = self._gptq_order(ctx) if o.error == "conditional" else None
        # keyed by content: the model's weights, the calibration token ids and the preprocessors
        # (with their options) that transform the weights before the candidates are measured
        pre = [(n, ctx.run.component_options(n)) for n in ctx.run.preprocessors]
        model = weights_digest(ctx.model_folder) if ctx.model_folder else None
        calib = tensor_digest(ctx.calibration_ids) if ctx.calibration_ids is not None else None
        key = hashlib.sha1(json.dumps([model, calib, pre, o.error, gptq_order, self.uses_curvature, o.curvature_samples, o.fisher,
                                       ctx.run.symmetric, sorted({_label(c) for n in names for c in allowed[n]}),
                                       ctx.run.calibration.__repr__(), o.binary_format if binary else None,
                                       repr(proxy.options) if proxy else None], default=str).encode()).hexdigest()[:16]
        path = cache_root() / "autobit" / f"{key}.pt"
        cached = torch.load(path, weights_only=True) if o.cache and path.is_file() else {}
        rows, B = cached.get("rows", {}), cached.get("B")
        if any(f"{n}|{_label(c)}" not in rows for n in names for c in allowed[n]):   # statistics only if needed
            A = ctx.input_diag() if o.error == "activation" else \
                self._conditional(ctx, *gptq_order) if o.error == "conditional" else {}
            B = self._curvature(ctx, names) if B is None else B
            workers = o.workers or min(8, os.cpu_count() or 1)
            with ThreadPoolExecutor(workers) as pool:      # torch releases the GIL inside its ops
                for k, n in enumerate(names):
                    todo = [c for c in allowed[n] if f"{n}|{_label(c)}" not in rows]
                    if not todo:
                        continue
                    if k % 10 == 9:
                        # the workers' freed weight-sized temporaries stay in their threads' heaps: handed
                        # back every 10 modules (without it the resident size grew 4.1 GB on SmolLM2)
                        release_memory()
                    W, a = ctx.weight(n).float(), A.get(n)     # one module's weight in memory at a time

                    def err(c, n=n, W=W, a=a):
                        return row_errors(self._proxy_weight(ctx, proxy, n, c, spec, W, a) - W, a)
                    for c, r in zip(todo, pool.map(err, todo)):     # the module's candidates in parallel
                        rows[f"{n}|{_label(c)}"] = r
        B = B if B is not None else self._curvature(ctx, names)
        if o.cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save({"rows": rows, "B": B}, tmp)
            tmp.replace(path)
        return {n: [rows[f"{n}|{_label(c)}"] for c in allowed[n]] for n in names}, B

    def _curvature(self, ctx, names) -> dict:
        o = self.options
        if not self.uses_curvature:
            return {}
        return output_curvature(ctx.model_folder, ctx.calibration_ids, names, ctx.device, o.curvature_samples, o.fisher)

    @staticmethod
    def _proxy_weight(ctx, proxy, n, c, spec, W, A=None) -> torch.Tensor:
        """Module n's weight under candidate c's fast proxy: RTN for a grid, a short fit
        (weighted by the Gram diagonal A when known) for a binary factorisation."""
        if c[0] == "int":
            return rtn_weight(W, c[1], c[2], ctx.run.symmetric)
        s = spec(n, c)
        H = torch.diag(A.float()) if A is not None else None      # only the Gram diagonal is known here
        return proxy.project(W, H, s, ctx.formats[s.format]).dequantize(torch.float32)

    @staticmethod
    def _projector_options(ctx):
        return getattr(ctx.make("projector", ctx.run.projector), "options", None) if ctx.make else None

    def _gptq_like(self, ctx) -> bool:
        """The run's projector spreads rounding error over later columns (it has GPTQ's
        ``damp`` and ``act_order`` options: gptq, jointq)."""
        opts = self._projector_options(ctx)
        return hasattr(opts, "damp") and hasattr(opts, "act_order")

    def _gptq_order(self, ctx) -> tuple:
        """(damp, act_order) of the run's projector when it has them (GPTQ, JointQ), else
        GPTQ's defaults: the conditional variances follow the order the projector will use."""
        opts = self._projector_options(ctx)
        return float(getattr(opts, "damp", 0.01)), bool(getattr(opts, "act_order", True))

    @staticmethod
    def _conditional(ctx, damp, act_order) -> dict:
        if ctx.input_grams is None:
            raise OnecompError("autobit.error='conditional' needs a planner context with full input Grams "
                               "(ctx.input_grams); use error='activation' with this runner")
        return ctx.input_grams(lambda H: conditional_variances(H, damp, act_order))

    def _binary_proxy(self, ctx):
        """The binary format's projector with ``binary_iters`` refinement steps: the fast proxy
        that plays RTN's part for binary-factor candidates."""
        proj = self._binary_component(ctx, "projector")
        if hasattr(proj.options, "iters"):
            proj.options = attrs.evolve(proj.options, iters=self.options.binary_iters)
        return proj

    def _budget(self, ctx, total):
        b = ctx.run.budget
        given = b.given()
        if len(given) != 1:
            raise OnecompError("planner 'autobit' needs exactly one budget: --target-bpw X, --budget-bytes SIZE "
                               f"or --fit-memory SIZE (given: {', '.join(given) or 'none'})")
        if b.target_bpw is not None:
            return b.target_bpw * total, {"budget_from": "target_bpw"}
        if b.budget_bytes is not None:
            return parse_size(b.budget_bytes) * 8.0, {"budget_from": "budget_bytes"}
        bits, over = fit_memory_budget_bits(parse_size(b.fit_memory), ctx.model_config, ctx.param_count - total,
                                            b.context, b.batch)
        return bits, {"budget_from": "fit_memory", "overhead_bytes": over}

    def _heatmap(self, ctx, specs):
        rows, kinds = {}, []
        for n in ctx.shapes:
            m = re.match(r"(.*\.\d+)\.(.+)$", n)
            block, kind = (m.group(1), m.group(2)) if m else ("", n)
            if kind not in kinds:
                kinds.append(kind)
            s = specs.get(n)
            rows.setdefault(block, {})[kind] = self._bits(ctx, s) if s else None
        return allocation_png([[r.get(k) for k in kinds] for r in rows.values()])


@hookimpl
def onecomp_register_planners(registry):
    registry.add_planner(AutoBit)
