"""Plugin glue: the ``blockcomp`` block refiner."""
from __future__ import annotations

import attrs
import torch

from onecomp_core.sdk import BlockRefiner, hookimpl, in_range

from .compensate import compensate


@attrs.define(frozen=True)
class BlockCompOptions:
    steps: int = attrs.field(default=8, validator=in_range(0, 10_000))
    lr: float = attrs.field(default=1e-3, validator=in_range(0.0, 1.0))
    batch: int = attrs.field(default=2, validator=in_range(1, 4096))
    eval_samples: int = attrs.field(default=4, validator=in_range(1, 4096))
    seed: int = attrs.field(default=0, validator=in_range(0, 2**31))


class BlockCompensation(BlockRefiner):
    """Before each group of a block is quantized: a few Adam steps on the block's still-FP
    linears (the group included) so the partly quantized block matches the FP block output;
    kept only when it lowers the block error on held samples."""
    name = "blockcomp"
    Options = BlockCompOptions

    def before_group(self, bctx, group):
        names = [n for n, m in bctx.block.named_modules() if isinstance(m, torch.nn.Linear)
                 and n not in bctx.quantized and n.rsplit(".", 1)[-1] not in ("gate",)]
        params = [bctx.block.get_submodule(n).weight for n in names]
        o = self.options
        compensate(bctx.block, params, bctx.q_inputs, bctx.fp_outputs, bctx.kwargs, steps=o.steps,
                   lr=o.lr, batch=o.batch, eval_samples=o.eval_samples, seed=o.seed)


@hookimpl
def onecomp_register_refiners(registry):
    registry.add_refiner(BlockCompensation)
