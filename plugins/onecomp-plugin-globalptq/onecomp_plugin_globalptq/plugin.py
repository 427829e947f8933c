"""Plugin glue: the ``globalptq`` model refiner (KL distillation through trainable views)."""
from __future__ import annotations

import sys

import attrs
import torch

from onecomp_core.sdk import ModelRefiner, boolean, hookimpl, in_range, one_of

from .student import attach_views
from .train import distill


@attrs.define(frozen=True)
class GlobalPTQOptions:
    epochs: int = attrs.field(default=2, validator=in_range(0, 10_000))
    batch: int = attrs.field(default=1, validator=in_range(1, 4096))              # samples per Adam step
    lr_scales: float = attrs.field(default=1e-3, validator=in_range(0.0, 1.0))    # relative to each tensor's RMS
    lr_codes: float = attrs.field(default=1e-3, validator=in_range(0.0, 10.0))    # in grid steps
    train_codes: bool = attrs.field(default=False, validator=boolean)
    temperature: float = attrs.field(default=1.0, validator=in_range(0.05, 100.0))
    hidden_weight: float = attrs.field(default=0.0, validator=in_range(0.0, 100.0))   # per-layer cosine term
    entropy_weight: float = attrs.field(default=0.0, validator=in_range(0.0, 100.0))
    sam_rho: float = attrs.field(default=0.0, validator=in_range(0.0, 10.0))       # 0: plain Adam
    progressive: bool = attrs.field(default=False, validator=boolean)              # unfreeze from the output side
    clip: float = attrs.field(default=1.0, validator=in_range(0.0, 1e6))
    checkpointing: bool = attrs.field(default=False, validator=boolean)            # gradient checkpointing
    dtype: str = attrs.field(default="float32", validator=one_of("float32", "bfloat16"))
    seed: int = attrs.field(default=0, validator=in_range(0, 2**31))


class GlobalPTQ(ModelRefiner):
    """KL(teacher || student) distillation of the whole quantized model: every quantized
    module trains through its format's trainable view (codes frozen by default); returns stored
    tensors of the same format and bits. The scheduler keeps them only if the held-out KL falls."""
    name = "globalptq"
    Options = GlobalPTQOptions
    needs_trainable = True

    def refine(self, mctx):
        o = self.options
        teacher = mctx.load_reference()
        student = mctx.load()
        dtype = getattr(torch, o.dtype)
        views = attach_views(student, mctx.quantized(), mctx.plan, mctx.formats)
        student.to(dtype)
        for p in student.parameters():
            p.requires_grad_(False)
        for v in views.values():
            for ps in v.param_groups().values():
                for p in ps:
                    p.data = p.data.float()
                    p.requires_grad_(True)
        if o.checkpointing:
            if hasattr(student, "activation_checkpointing_enable"):      # transformers >= 5.2x
                student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        state = None if mctx.scratch is None else mctx.scratch / "state.pt"
        distill(student, teacher, views, mctx.calibration_ids, o, state,
                log=lambda m: print(m, file=sys.stderr, flush=True))
        with torch.no_grad():
            return {name: v.write_back() for name, v in views.items()}


@hookimpl
def onecomp_register_refiners(registry):
    registry.add_refiner(GlobalPTQ)
