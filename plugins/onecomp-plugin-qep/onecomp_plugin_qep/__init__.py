"""onecomp-plugin-qep: quantization error propagation, a layer-wise correction.

Public API for other plugins (LPCD builds on it): ``qep_target``, ``writer_target`` (the math),
``QEP``, ``QEPOptions``, ``patterns`` (the option validator for module name patterns).
"""
__version__ = "0.2.0"

from .plugin import QEP, QEPOptions, patterns  # noqa: E402
from .qep import qep_target, writer_target  # noqa: E402

__all__ = ["QEP", "QEPOptions", "patterns", "qep_target", "writer_target"]
