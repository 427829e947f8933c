"""The model adapter interface and the lookup by ``model_type``."""
from __future__ import annotations

from typing import ClassVar

import attrs
import torch

from ..errors import OnecompError


class ModelAdapter:
    """Knows an architecture: where its blocks are, each block's linear modules in execution
    order grouped by shared input, the coupled submodules LPCD works on, and how checkpoint
    keys map to module parameters.

    Subclasses set ``name`` and ``model_types`` and may override any method.
    """
    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]] = ()

    @attrs.define(frozen=True)
    class Options:
        pass

    def __init__(self, config, options=None):
        self.config = config
        self.options = options if options is not None else self.Options()

    @classmethod
    def supports(cls, config) -> bool:
        return getattr(config, "model_type", None) in cls.model_types

    # -- structure -------------------------------------------------------------------------
    def blocks_path(self) -> str:
        return "model.layers"

    def num_blocks(self) -> int:
        return int(self.config.num_hidden_layers)

    def prepare_block(self, block: torch.nn.Module) -> torch.nn.Module:
        """Rewrite a freshly built (meta) block into the form that is quantized and saved,
        e.g. split fused expert tensors into one linear per expert. Default: unchanged."""
        return block

    def linear_groups(self, block: torch.nn.Module) -> list[list[str]]:
        """Names (relative to the block) of the linears to quantize, in execution order;
        the linears of one group read the same input and are quantized together."""
        raise NotImplementedError

    def submodules(self, block: torch.nn.Module) -> dict[str, list[str]]:
        """Coupled layer groups for submodule-level corrections (LPCD): ``qk``, ``vo``,
        ``mlp`` -> relative linear names."""
        return {}

    def replayable(self, block: torch.nn.Module) -> list[str]:
        """Submodules (relative names) whose output depends only on their input and their own
        weights, called once per block forward: once their linears are final, the layer-wise
        pass records their output in one forward and returns it in the later ones instead of
        computing it again. Default: none."""
        return []

    def output_projection(self, block: torch.nn.Module, name: str) -> str | None:
        """The linear (relative name) whose output is exactly the first output of the replayable
        submodule ``name`` (the attention's o_proj), or None. Once the submodule's other linears
        are final, the pass records that linear's input and skips the rest of the submodule in
        later forwards (checked against one real forward). Default: none."""
        return None

    def residual_taps(self, block: torch.nn.Module) -> dict[str, str]:
        """Linears whose output is added unnormalised to the residual stream -> the module whose
        input is that residual stream value (for the residual-aware corrections)."""
        return {}

    def norm_inputs(self, block: torch.nn.Module) -> dict[str, list[str]]:
        """Norms whose output feeds linear maps directly -> the modules reading it (each has a
        ``weight`` whose columns index the norm's output channels: linears, MoE routers). What
        function-preserving transforms fold into: a per-channel scale on the norm's output is
        undone exactly by scaling those columns."""
        return {}

    def norm_offset(self, block: torch.nn.Module, norm: str) -> float:
        """c in the norm's output x_hat * (c + w): 0 for Llama-style RMSNorm, 1 for Gemma's."""
        return 0.0

    def final_norm_path(self) -> str | None:
        """The norm between the last block and the head (None: the architecture has none)."""
        return "model.norm"

    def residual_layout(self, block: torch.nn.Module) -> "ResidualLayout | None":
        """What a rotation of the residual stream must rewrite in ``block`` (see
        :class:`ResidualLayout`), or None when the block cannot be rotated exactly (e.g. norms
        applied to a writer's output before the residual add). Default: not known."""
        return None

    def checkpoint_keys(self, key: str) -> list[str]:
        """Checkpoint keys to try, in order, for a parameter named ``key`` in the model."""
        return [key]


@attrs.define(frozen=True)
class ResidualLayout:
    """A block as a residual-stream transform sees it (names relative to the block).

    ``norms``: each norm feeding linear maps -> its readers (their columns index the stream);
    ``offset``: c in the norms' x_hat * (c + w); ``writers``: the linears whose output is added
    to the stream unnormalised (their rows index it); ``value``: (linear, first row) of the
    value projection's rows (a fused qkv's v rows start after q and k); ``output``: the
    attention output projection, whose columns are the heads' outputs; ``head_dim``: the width
    of one attention head."""
    norms: dict
    offset: float
    writers: list
    value: tuple
    output: str
    head_dim: int


def find_adapter(config, registry) -> ModelAdapter:
    adapters = registry.items("model_adapter")
    for name in sorted(adapters):
        if adapters[name].supports(config):
            return adapters[name](config)
    mt = getattr(config, "model_type", "?")
    known = sorted({t for a in adapters.values() for t in a.model_types})
    raise OnecompError(
        f"unsupported architecture {mt!r}; supported model types: {', '.join(known)}. "
        f"To add one, write a ModelAdapter plugin (docs/plugins.md#model-adapters)")
