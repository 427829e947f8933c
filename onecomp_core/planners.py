"""The uniform planner: one bit width, group size and projector for every linear."""
from __future__ import annotations

import fnmatch

import torch

from .components import Planner
from .errors import OnecompError
from .spec import LayerSpec, Plan


def excluded(name: str, patterns) -> bool:
    """fnmatch patterns against the full name or its last component (``lm_head``, ``*.down_proj``)."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], p) for p in patterns)


def scale_dtype_for(checkpoint_dtype: torch.dtype) -> str:
    return "bfloat16" if checkpoint_dtype == torch.bfloat16 else "float16"


class UniformPlanner(Planner):
    name = "uniform"

    def plan(self, ctx) -> Plan:
        run, shapes, formats = ctx.run, ctx.shapes, ctx.formats
        fmt = formats[run.format]
        per_module_bpw = getattr(fmt, "takes_bpw", False)   # binary factors: the bpw is the format's knob
        given = run.budget.given()
        if per_module_bpw and given == ["target_bpw"]:
            given = []
        if given:
            raise OnecompError(f"planner 'uniform' takes no budget ({', '.join(given)}); drop it or use a budget "
                               "planner such as --planner autobit (onecomp-plugin-autobit)")
        return Plan(uniform_specs(run, shapes, fmt, ctx.checkpoint_dtype), planner=self.name)


def uniform_specs(run, shapes: dict, fmt, checkpoint_dtype) -> dict[str, LayerSpec]:
    """The run's one spec for every linear not excluded, each checked against its format (also
    called before calibration, so a spec the format cannot hold stops the run at once)."""
    bpw = run.budget.target_bpw
    options = {"bpw": bpw} if getattr(fmt, "takes_bpw", False) and bpw is not None else {}
    specs = {}
    for name, shape in shapes.items():
        if excluded(name, run.exclude):
            continue
        spec = LayerSpec(name=name, format=run.format, projector=run.projector, bits=run.bits,
                         group_size=run.group_size, symmetric=run.symmetric,
                         scale_dtype=scale_dtype_for(checkpoint_dtype), options=dict(options))
        fmt.check(spec, shape)
        specs[name] = spec
    if not specs:
        raise OnecompError("nothing to quantize: every linear matches an exclude pattern")
    return specs
