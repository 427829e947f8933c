"""tqdm progress bars driven by the observation hooks. ONECOMP_PROGRESS=0 silences them."""
from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def reporting() -> bool:
    """Whether progress shows: not silenced (ONECOMP_PROGRESS=0), and in a data-parallel run only on rank 0."""
    return os.environ.get("ONECOMP_PROGRESS", "1") not in ("0", "false", "no") and os.environ.get("RANK", "0") == "0"


class Progress:
    def __init__(self):
        self.blocks = None
        self.layers = None

    @property
    def enabled(self) -> bool:
        return reporting()

    def stage_start(self, stage, info):
        if self.enabled and stage != "layerwise":
            print(f"[onecomp] {stage} ...", file=sys.stderr, flush=True)

    def stage_finish(self, stage, info):
        if stage == "layerwise" and self.blocks is not None:
            self.blocks.close()
            self.blocks = None
        if self.enabled:
            print(f"[onecomp] {stage} done in {info.get('seconds', 0):.1f}s", file=sys.stderr, flush=True)

    def block_start(self, index, total, layers):
        if not self.enabled:
            return
        if self.blocks is None:
            self.blocks = tqdm(total=total, initial=index, desc="blocks", unit="block", file=sys.stderr)
        self.per_pass = max(len(layers), 1)
        self.layers = tqdm(total=self.per_pass, desc=f"block {index} layers", unit="layer", leave=False,
                           file=sys.stderr)

    def layer_done(self, block, name, info):
        if self.layers is not None:
            if self.layers.n >= self.layers.total:      # a block refiner re-quantizes the block: one more pass
                self.layers.total += self.per_pass
            self.layers.update(1)
            self.layers.set_postfix_str(f"{name.rsplit('.', 1)[-1]} err={info.get('rel_error', 0):.2e}")

    def block_done(self, index, total, info):
        if self.layers is not None:
            self.layers.close()
            self.layers = None
        if self.blocks is not None:
            self.blocks.update(1)


def bar(total: int, desc: str, unit: str = "step"):
    """A progress bar for a plugin's long loop (a silent one under ONECOMP_PROGRESS=0 and on ranks other than 0)."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False,
                disable=not reporting())
