"""onecomp-plugin-globalptq: global PTQ, a model refiner that distils the FP model into the
quantized one (KL on token distributions) through its formats' trainable views.

Public API for other plugins: ``distill`` (the epoch-resumable loop), ``attach_views``,
``kl_loss``, ``entropy``, ``hidden_cosine``, ``unfrozen``.
"""
__version__ = "0.2.0"

from .distill import entropy, hidden_cosine, kl_loss, unfrozen  # noqa: E402
from .student import attach_views  # noqa: E402
from .train import distill  # noqa: E402

__all__ = ["distill", "attach_views", "kl_loss", "entropy", "hidden_cosine", "unfrozen"]
