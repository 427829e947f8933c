"""onecomp: turn a Hugging Face causal LM into a deployable low-bit model.

>>> import onecomp_core
>>> onecomp_core.quantize("path/or/hub-id", bits=4, group_size=128, out="model-4bit")
>>> model = onecomp_core.load_quantized("model-4bit")
"""
__version__ = "0.1.0"

from .errors import OnecompError  # noqa: E402


def quantize(*args, **kwargs):
    from .api import quantize as _q
    return _q(*args, **kwargs)


def load_quantized(*args, **kwargs):
    from .checkpoint import load_quantized as _l
    return _l(*args, **kwargs)


__all__ = ["quantize", "load_quantized", "OnecompError", "__version__"]
