from onecomp_core.testing import pytest_configure, tiny_llama, tiny_models  # noqa: F401  (fixtures, markers)
