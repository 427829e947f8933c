"""Plugin glue: the ``hadamard`` preprocessor and its transform, applied to each block as it loads."""
from __future__ import annotations

import attrs
import torch

from onecomp_core.sdk import OnecompError, Preprocessor, Transform, boolean, hookimpl, in_range

from .fuse import columns_times, fold_norm, rotate_heads_columns, rotate_heads_rows, rows_times
from .hadamard import largest_order, rotation


@attrs.define(frozen=True)
class HadamardOptions:
    seed: int = attrs.field(default=0, validator=in_range(0, 2**31 - 1))
    r2: bool = attrs.field(default=True, validator=boolean)            # also rotate each head's value/output pair
    online_down: bool = attrs.field(default=False, validator=boolean)


class HadamardRotation(Transform):
    """R1 on the residual stream (norms folded first), R2 on each head's value/output pair."""

    def __init__(self, adapter, R1: torch.Tensor, R2: torch.Tensor | None, tied: bool, arch: str):
        self.adapter, self.R1, self.R2, self.tied, self.arch = adapter, R1, R2, tied, arch
        self.untied = False

    def apply_block(self, index, block):
        lay = layout_of(self.adapter, block, self.arch)
        R1 = self.R1.to(next(block.parameters()).device)
        for norm, readers in lay.norms.items():                       # W <- W diag(g) R1
            fold_norm(block.get_submodule(norm).weight, lay.offset,
                      [block.get_submodule(r).weight for r in readers], R1)
        for name in lay.writers:                                      # W <- R1^T W, b <- R1^T b
            lin = block.get_submodule(name)
            rows_times(lin.weight, R1.T)
            if lin.bias is not None:
                rows_times(lin.bias, R1.T)
        if self.R2 is not None:
            v_name, first = lay.value
            v = block.get_submodule(v_name)
            kv_heads = (v.out_features - first) // lay.head_dim
            rotate_heads_rows(v.weight, first, kv_heads, self.R2)
            if v.bias is not None:
                rotate_heads_rows(v.bias, first, kv_heads, self.R2)
            rotate_heads_columns(block.get_submodule(lay.output).weight, self.R2)

    def apply_final(self, norm, head):
        if head is None or norm is None:
            raise OnecompError(f"hadamard: {self.arch} has no final norm and head the adapter names; "
                               f"the rotation cannot be undone at the output")
        offset = self.adapter.norm_offset(None, "norm")
        g = offset + norm.weight.detach().double()
        if self.tied and not torch.all(g == 1):
            self.untied = True                   # the head now differs from the embedding
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)   # its own tensor
        fold_norm(norm.weight, offset, [head.weight], torch.eye(g.numel(), dtype=torch.float64))

    def apply_outer(self, embeddings, head):
        columns_times(embeddings.weight, self.R1)                    # E <- E R1
        if head is not None:
            columns_times(head.weight, self.R1)                      # W <- W diag(g) R1 (g folded above)

    def checkpoint_config(self):
        return {"tie_word_embeddings": False} if self.untied else {}

    def describe(self):
        return {"hidden": self.R1.shape[0], "head_dim": None if self.R2 is None else self.R2.shape[0],
                "hadamard_order": largest_order(self.R1.shape[0]), "untied_head": self.untied}


def layout_of(adapter, block, arch: str):
    lay = adapter.residual_layout(block)
    if lay is None:
        raise OnecompError(f"hadamard cannot rotate {arch} exactly: its blocks normalise attention/MLP outputs "
                           f"before the residual add (post-norms); drop --preprocessor hadamard for this model")
    return lay


class Hadamard(Preprocessor):
    """Randomised Hadamard rotations fused into the weights (QuaRot-style, weights only): a
    function-preserving transform that spreads outlier channels before quantization."""
    name = "hadamard"
    Options = HadamardOptions

    def fit(self, ctx):
        o = self.options
        cfg = ctx.model_config
        arch = getattr(cfg, "model_type", "?")
        if o.online_down:
            raise OnecompError("hadamard.online_down=true needs a format and loader that apply a Hadamard before "
                               "down_proj at run time; none is installed: leave hadamard.online_down=false")
        block = ctx.block(0)
        try:
            lay = layout_of(ctx.adapter, block, arch)
        finally:
            ctx.release(0)
        R1 = rotation(int(cfg.hidden_size), o.seed)
        R2 = rotation(lay.head_dim, o.seed + 1) if o.r2 else None
        return HadamardRotation(ctx.adapter, R1, R2, bool(getattr(cfg, "tie_word_embeddings", False)), arch)


@hookimpl
def onecomp_register_preprocessors(registry):
    registry.add_preprocessor(Hadamard)
