import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "tests"))
os.environ.setdefault("ONECOMP_PROGRESS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny import make_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """arch -> folder of a tiny random model (built once per session, on first use)."""
    root = tmp_path_factory.mktemp("tiny")
    cache = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            cache[arch] = make_model(arch, root / arch)
        return cache[arch]
    return get


@pytest.fixture
def tiny_llama(tiny_models):
    return tiny_models("llama")


def quick(**kw):
    """Keyword arguments for a fast quantize() call on a tiny model."""
    base = dict(bits=4, group_size=32, projector="rtn", num_samples=2, seq_len=32)
    base.update(kw)
    return base
