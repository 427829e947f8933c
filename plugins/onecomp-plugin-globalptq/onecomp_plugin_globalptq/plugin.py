"""Plugin glue: the ``globalptq`` model refiner (KL distillation through trainable views)."""
from __future__ import annotations

import math
import sys
import time

import attrs
import torch

from onecomp_core.sdk import ModelRefiner, boolean, hookimpl, in_range, one_of, rss_bytes

from .student import attach_views
from .train import distill


@attrs.define(frozen=True)
class GlobalPTQOptions:
    epochs: int = attrs.field(default=2, validator=in_range(0, 10_000))
    batch: int = attrs.field(default=1, validator=in_range(1, 4096))              # samples per Adam step
    lr_scales: float = attrs.field(default=2e-3, validator=in_range(0.0, 1.0))    # relative to each tensor's RMS
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
    data_parallel = True           # each rank trains on its shard; gradients averaged before every step

    def _student(self, mctx, o):
        """The teacher, and the checkpoint with a trainable view over every quantized module."""
        teacher = mctx.load_reference()
        student = mctx.load()
        views = attach_views(student, mctx.quantized(), mctx.plan, mctx.formats)
        student.to(getattr(torch, o.dtype))
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
        return teacher, student, views

    def estimate(self, mctx):
        """Predicted peak of the process: what is resident now (the teacher is loaded by then)
        + the student: its other parameters in the compute dtype, per quantized weight the code
        latent, the materialised weight and the view's autograd tensors (~16 B; +8 B of Adam
        moments where codes train) + one step's activations (per layer and token ~20 hidden + 8
        intermediate values, and the attention scores; the logits ~6 rows of the vocabulary per
        token). Time: one timed step (student forward + backward, teacher forward) on
        ``batch`` samples, the second of two (the first warms up), x the steps (x2 with SAM)."""
        o = self.options
        reference = mctx.load_reference()
        cfg = reference.config
        qts = mctx.quantized()
        quant = sum(math.prod(qts.shape(name)) for name in qts)        # from the metadata: no tensor is read
        width = 4 if o.dtype == "float32" else 2
        total = sum(p.numel() for p in reference.parameters())
        layers, hidden = int(cfg.num_hidden_layers), int(cfg.hidden_size)
        inter = int(getattr(cfg, "intermediate_size", 4 * hidden) or 4 * hidden)
        heads, vocab = int(getattr(cfg, "num_attention_heads", 1)), int(cfg.vocab_size)
        seq = int(mctx.calibration_ids.shape[1])
        per_layer = o.batch * seq * (20 * hidden + 8 * inter) * width + o.batch * heads * seq * seq * 4 * 2
        acts = per_layer + layers * o.batch * seq * hidden * width if o.checkpointing else layers * per_layer
        memory = (rss_bytes() + (total - quant) * width + quant * (16 + (8 if o.train_codes else 0))
                  + acts + o.batch * seq * vocab * 4 * 6)
        return {"memory_bytes": int(memory), "seconds": lambda: self._probe_seconds(mctx)}   # probed only if it fits

    def _probe_seconds(self, mctx) -> float:
        o = self.options
        probe = attrs.evolve(o, epochs=1)
        teacher, student, views = self._student(mctx, probe)
        ids = mctx.calibration_ids[:o.batch]
        distill(student, teacher, views, ids, probe)     # the first step pays for allocation and set-up
        t0 = time.time()
        distill(student, teacher, views, ids, probe)     # the second is timed
        step = time.time() - t0
        steps = o.epochs * -(-mctx.calibration_ids.shape[0] // o.batch)
        return step * steps * (2 if o.sam_rho > 0 else 1)

    def refine(self, mctx):
        o = self.options
        teacher, student, views = self._student(mctx, o)
        state = None if mctx.scratch is None else mctx.scratch / "state.pt"
        ids = mctx.shard_ids()
        distill(student, teacher, views, ids, o, state,
                log=(lambda m: print(m, file=sys.stderr, flush=True)) if mctx.leader else None,
                sync=mctx.sync_gradients, steps_per_epoch=mctx.max_over_ranks(-(-ids.shape[0] // o.batch)),
                save=mctx.leader)
        with torch.no_grad():
            return {name: v.write_back() for name, v in views.items()}


@hookimpl
def onecomp_register_refiners(registry):
    registry.add_refiner(GlobalPTQ)
