"""onecomp-plugin-blockptq: block-wise PTQ, a block refiner that trains a quantized block's
stored tensors (through its formats' trainable views) to match the FP block's output.

Public API for other plugins: ``reconstruct`` (train views of a block's linears towards block
targets), ``block_loss``, ``lr_factor``, ``temperature``, ``split_rows``.
"""
__version__ = "0.2.0"

from .reconstruct import block_loss, lr_factor, reconstruct, split_rows, temperature  # noqa: E402

__all__ = ["reconstruct", "block_loss", "lr_factor", "temperature", "split_rows"]
