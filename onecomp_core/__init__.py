"""onecomp: turn a Hugging Face causal LM into a deployable low-bit model.

>>> import onecomp_core
>>> onecomp_core.quantize("path/or/hub-id", bits=4, group_size=128, out="model-4bit")
>>> model = onecomp_core.load_quantized("model-4bit")

Plugins import from :mod:`onecomp_core.sdk`; their tests may use :mod:`onecomp_core.testing`.
"""
__version__ = "0.2.0"

from .errors import OnecompError  # noqa: E402


def quantize(*args, **kwargs):
    from .api import quantize as _q
    return _q(*args, **kwargs)


def refine(*args, **kwargs):
    from .api import refine as _r
    return _r(*args, **kwargs)


def load_quantized(*args, **kwargs):
    from .checkpoint import load_quantized as _l
    return _l(*args, **kwargs)


def describe_config(model=None, config=None, *, plugins=(), options=None, **fields) -> dict:
    """The resolved configuration of a run (what ``onecomp config --show`` prints): the fields,
    every named component's validated options; raises :class:`OnecompError` where a quantize
    call with the same arguments would stop before reading the model."""
    from .config import make_config
    from .plugins import load_plugins
    from .resolve import Resolved
    run = make_config(model, config, options=options, **fields)
    return Resolved(run, load_plugins(extra=list(plugins))).describe()


__all__ = ["quantize", "refine", "load_quantized", "describe_config", "OnecompError", "__version__"]
