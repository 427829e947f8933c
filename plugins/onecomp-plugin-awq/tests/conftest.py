from onecomp_core.testing import tiny_llama, tiny_models  # noqa: F401  (pytest fixtures)
