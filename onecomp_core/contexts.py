"""What each stage hands the components it calls. Plain records: the scheduler fills them, the
components read them (and call the functions they carry). The block-scope context, which also
acts on the block, is :class:`onecomp_core.block_pass.BlockContext`."""
from __future__ import annotations

from pathlib import Path

import attrs
import torch

from .spec import LayerSpec


@attrs.define
class LayerContext:
    """What a correction sees while one linear is quantized."""
    name: str                       # full module name
    spec: LayerSpec
    weight: torch.Tensor            # the layer's full-precision weight (float32), as it is in the block now
    target: torch.Tensor            # what the projector will aim at (starts as ``weight``)
    H: torch.Tensor | None          # input Gram of the quantized stream (stats["gram"].H), or None
    stats: dict                     # kind -> Statistic gathered for this linear ("gram", "cross", "residual")
    module: torch.nn.Module         # the live linear inside the block
    block: torch.nn.Module
    fmt: object
    pass_index: int = 0             # 0: the block's first quantization of this linear; > 0: a block refiner's redo


@attrs.define
class PlanContext:
    """What a planner may use. ``weight`` and the statistics are computed on demand."""
    shapes: dict                      # module name -> (out, in), execution order
    groups: list                      # lists of module names sharing one input (q/k/v, gate/up, ...)
    run: object                       # the RunConfig
    formats: dict                     # format name -> format object (a planner may add to it through make)
    registry: object
    checkpoint_dtype: torch.dtype     # the dtype the output checkpoint stores its floating tensors in (store_dtype)
    weight: object                    # name -> float32 FP weight (after the preprocessors' transforms)
    input_diag: object                # () -> {name: diag(X X^T) / N}, one FP pass over the blocks
    input_grams: object = None        # (fn) -> {name: fn(H)}, H = X X^T / N, one FP pass, one block's Grams held
    model_folder: object = None
    calibration_ids: object = None    # (N, L) token ids
    device: object = None
    make: object = None               # (kind, name) -> that component, built once with the run's options
    model_config: object = None       # the transformers config of the model
    param_count: int = 0              # parameters of the whole checkpoint (for memory budgets)


@attrs.define
class PreprocessContext:
    """What a preprocessor's ``fit`` may use. Blocks come with the transforms of the
    preprocessors before it already applied; ``inputs()`` are the block-0 inputs of the
    calibration samples under those transforms."""
    run: object
    adapter: object
    num_blocks: int
    block: object                     # (i) -> block i, loaded (FP, earlier transforms applied)
    release: object                   # (i) -> free block i again
    block_prefix: object              # (i) -> "model.layers.i"
    inputs: object                    # () -> ((N, L, d) block-0 inputs, [per-block call kwargs])
    calibration_ids: torch.Tensor
    device: torch.device
    batch: int                        # calibration samples per block forward
    model_config: object = None
    outer: object = None              # () -> (final norm, head) loaded (earlier transforms applied); None: no head
    release_outer: object = None      # () -> free them again
    max_memory: int | None = None     # bytes the run may use (--max-memory, else the machine's)
    project: object = None            # (name, W, H) -> W^: the run's projector and grid on W, dequantized; None if excluded


@attrs.define
class EstimateContext:
    """What a block refiner's ``estimate`` sees under ``--refine auto``, before the layer-wise
    pass: the model's shape, the data it will train on and a timed probe."""
    model_config: object
    num_blocks: int
    block_weights: int                # quantized weights in the largest block
    block_params: int                 # all parameters of the largest block
    train_samples: int
    seq_len: int
    device: torch.device
    time_block_step: object           # () -> seconds of one fp32 forward + backward of block 0 on one sample
    step_with_views: bool = False     # the probe trains block 0 through its trainable views (a finished checkpoint's)


@attrs.define
class ModelContext:
    """What a model-scope refiner sees: the current checkpoint (the pivot, or the result of the
    refiners before it that were kept) and the data to train and judge on."""
    checkpoint: Path                  # a complete, loadable checkpoint folder
    reference: Path                   # the full-precision model folder
    plan: object
    formats: dict
    calibration_ids: torch.Tensor     # (N, L) samples to train on
    heldout_ids: torch.Tensor         # (M, L) samples the keep-if-better check uses; do not train on them
    device: torch.device
    load: object                      # () -> the checkpoint as a runnable model (quantized modules trainable)
    load_reference: object            # () -> the FP model
    run: object = None
    quantized: object = None          # () -> Mapping {module name: stored quantized tensor}, each read when asked; .shape(name)
    scratch: Path | None = None       # this refiner's own folder in the run's work folder (resume state)
    ranks: object = None              # data-parallel ranks (distributed.Ranks); None: one process

    @property
    def leader(self) -> bool:
        """Whether this process writes (resume state, logs): rank 0, or the only process."""
        return self.ranks is None or self.ranks.leader

    def shard_ids(self) -> torch.Tensor:
        """This rank's contiguous shard of ``calibration_ids`` (all of them in one process)."""
        if self.ranks is None or not self.ranks.active:
            return self.calibration_ids
        return self.calibration_ids[self.ranks.shard(self.calibration_ids.shape[0])]

    def sync_gradients(self, params) -> None:
        """Average ``params``' gradients over the ranks (before each optimiser step); a no-op in one process."""
        if self.ranks is not None:
            self.ranks.average_gradients(params)

    def max_over_ranks(self, k: int) -> int:
        """The largest ``k`` over the ranks (e.g. steps per epoch, so every rank takes as many)."""
        return k if self.ranks is None else self.ranks.max_int(k)


@attrs.define
class ExportContext:
    """What an exporter writes from. ``folder`` is the output being assembled; the main
    exporter (``compressed-tensors``) has already written the checkpoint there when the others run."""
    folder: Path
    plan: object
    formats: dict
    shapes: dict                      # quantized module -> (out, in)
    block_files: list                 # committed blocks, one safetensors file each, in order
    outer_tensors: object             # () -> {name: tensor} outside the blocks (embeddings, norms; the head unless tied)
    config: dict                      # the model's config.json content, with the transforms' keys
    meta: dict                        # onecomp.json content besides "modules"
    source_folder: Path               # the source model folder (tokenizer files)
    checkpoint_dtype: torch.dtype     # the dtype the output checkpoint stores its floating tensors in (store_dtype)
    modules: dict = attrs.field(factory=dict)   # name -> spec dict with its shape (what onecomp.json lists)
