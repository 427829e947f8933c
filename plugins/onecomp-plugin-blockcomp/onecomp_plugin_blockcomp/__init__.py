"""onecomp-plugin-blockcomp: block-wise compensation, a block refiner.

Public API for other plugins (LPCD's later passes use it): ``compensate`` (Adam on some of a
block's weights towards the FP block output, kept only if the held-out block error drops).
"""
__version__ = "0.2.0"

from .compensate import compensate  # noqa: E402

__all__ = ["compensate"]
