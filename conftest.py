import os

os.environ.setdefault("ONECOMP_PROGRESS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from onecomp_core.testing import tiny_llama, tiny_models  # noqa: E402,F401  (pytest fixtures)
