"""onecomp-plugins-gptq: the GPTQ projector for the uniform format.

Public API for other plugins (JointQ starts from GPTQ): ``gptq`` (the pure math),
``GPTQOptions``, ``UniformProjector`` (base of GPTQ-family projectors), ``run_gptq``, ``GPTQ``.
"""
__version__ = "0.2.0"

from .gptq import gptq, prepare_hessian  # noqa: E402
from .plugin import GPTQ, GPTQOptions, UniformProjector, run_gptq  # noqa: E402

__all__ = ["gptq", "prepare_hessian", "GPTQ", "GPTQOptions", "UniformProjector", "run_gptq"]
