"""onecomp-plugins-dbf: binary-factor formats for 1-2 bits per weight.

Public API for other plugins (MDBF builds on it): the ``DBFFormat`` and its tensor and module
(``BinaryFactorTensor``, ``BinaryFactorLinear``), the ``DBF`` projector, its options
(``BinaryFactorOptions``), ``project_binary_factors`` and ``input_weighting`` (the fitting
glue), ``Metric`` (the weighted error of a factorisation).
"""
__version__ = "0.2.0"

from .factors import Metric  # noqa: E402
from .fmt import BinaryFactorLinear, BinaryFactorTensor, DBFFormat  # noqa: E402
from .plugin import DBF, BinaryFactorOptions, input_weighting, project_binary_factors  # noqa: E402

__all__ = ["Metric", "BinaryFactorLinear", "BinaryFactorTensor", "DBFFormat", "DBF", "BinaryFactorOptions",
           "input_weighting", "project_binary_factors"]
