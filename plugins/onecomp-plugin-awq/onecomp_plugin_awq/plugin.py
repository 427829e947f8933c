"""Plugin glue: the ``awq`` preprocessor. ``fit`` runs the FP model block by block on the
calibration stream, gathers each input group's Gram matrix and mean |x|, searches each group's
exponent (search.py) and keeps the scales; the transform folds them into each block as it loads."""
from __future__ import annotations

import sys

import attrs
import torch

from onecomp_core.sdk import Gram, Preprocessor, Transform, bar, boolean, hookimpl, in_range, run_block

from .search import projected_error, scales_for, search


@attrs.define(frozen=True)
class AWQOptions:
    steps: int = attrs.field(default=20, validator=in_range(1, 1000))       # alpha in {0, 1/steps, ...}
    samples: int = attrs.field(default=0, validator=in_range(0, 1 << 20))   # calibration samples used (0: all)
    verify: bool = attrs.field(default=True, validator=boolean)   # keep s only if the run's projector agrees


class _Inputs:
    """Forward pre-hooks gathering H = X^T X / N and mean |x| of some modules' inputs."""

    def __init__(self, modules: dict):
        self.gram = {n: Gram.of(m.weight.shape[1], m.weight.device) for n, m in modules.items()}
        self.abs = {n: torch.zeros(m.weight.shape[1], dtype=torch.float64, device=m.weight.device)
                    for n, m in modules.items()}
        self.count = dict.fromkeys(modules, 0)
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name):
        def hook(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            self.gram[name].add(x.float())
            self.abs[name] += x.double().abs().sum(0)
            self.count[name] += x.shape[0]
        return hook

    def close(self):
        for h in self.handles:
            h.remove()

    def mean_abs(self, name):
        return self.abs[name] / max(self.count[name], 1)


def _up_down(block):
    """(producer, first row, consumer) of the MLP's up -> down pair, or None (no dense MLP)."""
    names = {n for n, _ in block.named_modules()}
    if "mlp.down_proj" not in names:
        return None
    if "mlp.up_proj" in names:
        return "mlp.up_proj", 0, "mlp.down_proj"
    if "mlp.gate_up_proj" in names:                          # fused: up rows are the second half
        return "mlp.gate_up_proj", block.get_submodule("mlp.gate_up_proj").out_features // 2, "mlp.down_proj"
    return None


class AWQScaling(Transform):
    """Per block: (norm, readers, s) folds and (producer, first row, consumer, s) folds."""

    def __init__(self, adapter, folds: dict, report: list):
        self.adapter, self.folds, self.report = adapter, folds, report

    def apply_block(self, index, block):
        with torch.no_grad():
            for kind, *rest in self.folds.get(index, []):
                if kind == "norm":                          # (c + w) <- (c + w) / s; W <- W diag(s)
                    norm, readers, s = rest
                    w = block.get_submodule(norm).weight
                    c = self.adapter.norm_offset(block, norm)
                    s = s.to(w.device)
                    w.copy_(((c + w.double()) / s - c).to(w.dtype))
                    for r in readers:
                        W = block.get_submodule(r).weight
                        W.copy_((W.double() * s[None, :]).to(W.dtype))
                else:                                       # producer rows / s; consumer columns * s
                    producer, first, consumer, s = rest
                    p = block.get_submodule(producer)
                    s = s.to(p.weight.device)
                    rows = slice(first, first + s.numel())
                    p.weight[rows] = (p.weight[rows].double() / s[:, None]).to(p.weight.dtype)
                    if p.bias is not None:
                        p.bias[rows] = (p.bias[rows].double() / s).to(p.bias.dtype)
                    W = block.get_submodule(consumer).weight
                    W.copy_((W.double() * s[None, :]).to(W.dtype))

    def describe(self):
        alphas = [r["alpha"] for r in self.report]
        gain = [1 - r["error"] / r["error_none"] for r in self.report if r["error_none"] > 0]
        d = {"groups": len(self.report), "mean_alpha": round(sum(alphas) / max(len(alphas), 1), 4),
             "mean_error_reduction": round(sum(gain) / max(len(gain), 1), 4)}
        checked = [r for r in self.report if "projector_error" in r]
        if checked:             # the search's pick against s = 1 under the run's projector
            d["verified"] = len(checked)
            d["reverted"] = sum(r["reverted"] for r in checked)
        return d


class AWQ(Preprocessor):
    """Activation-aware scaling (Lin et al.): per input channel of each linear group, the scale
    whose exponent minimises the group's output error after quantization to the run's grid."""
    name = "awq"
    Options = AWQOptions

    def fit(self, ctx):
        o, run, adapter = self.options, ctx.run, ctx.adapter
        x, kwargs = ctx.inputs()
        if o.samples:
            x = x[:o.samples]
        folds, report = {}, []
        with bar(ctx.num_blocks, "awq", "block") as progress:
            for i in range(ctx.num_blocks):
                block = ctx.block(i)
                quantized = {n for g in adapter.linear_groups(block) for n in g}
                groups = adapter.norm_inputs(block)
                pair = _up_down(block)
                heads = {norm: readers[0] for norm, readers in groups.items()}
                watch = {r: block.get_submodule(r) for r in heads.values()}
                if pair:
                    watch[pair[2]] = block.get_submodule(pair[2])
                col = _Inputs(watch)
                try:
                    x = run_block(block, x, kwargs[i], batch=ctx.batch)         # FP: the scales change nothing
                finally:
                    col.close()
                fold = []
                prefix = ctx.block_prefix(i)

                def choose(names, h, group):
                    ws = {f"{prefix}.{r}": block.get_submodule(r).weight.detach() for r in names}
                    H = col.gram[h].H
                    s, alpha, err, none = search(list(ws.values()), H, col.mean_abs(h), run.bits, run.group_size,
                                                 run.symmetric, o.steps)
                    row = {"block": i, "group": group, "alpha": alpha, "error": err, "error_none": none}
                    if o.verify and alpha > 0 and ctx.project is not None:
                        ones = scales_for(col.mean_abs(h), 0.0)                       # s = 1: no scaling
                        e_s = projected_error(ws, H, s, ctx.project)
                        e_1 = projected_error(ws, H, ones, ctx.project)
                        row.update(projector_error=e_s, projector_error_none=e_1, reverted=e_s >= e_1)
                        if e_s >= e_1:                  # the run's projector does better unscaled
                            s, row["alpha"] = ones, 0.0
                    report.append(row)
                    return s

                for norm, readers in groups.items():
                    names = [r for r in readers if r in quantized]
                    if names:
                        fold.append(("norm", norm, list(readers), choose(names, heads[norm], norm)))
                if pair and pair[2] in quantized:
                    producer, first, consumer = pair
                    fold.append(("rows", producer, first, consumer, choose([consumer], consumer, consumer)))
                folds[i] = fold
                ctx.release(i)
                progress.update()
        if report and all(r["alpha"] == 0 for r in report):
            print(f"onecomp: note: {kept_none(report)}", file=sys.stderr, flush=True)
        return AWQScaling(adapter, folds, report)


def kept_none(report: list) -> str:
    """The line that says awq scaled nothing, and why (e.g. GPTQ with QEP already does better unscaled)."""
    reverted = sum(bool(r.get("reverted")) for r in report)
    return (f"awq kept no scales ({len(report)} groups: {len(report) - reverted} chose alpha 0, {reverted} did "
            f"worse under the run's projector): the model is quantized as it is; drop --preprocessor awq to save "
            f"its time")


@hookimpl
def onecomp_register_preprocessors(registry):
    registry.add_preprocessor(AWQ)
