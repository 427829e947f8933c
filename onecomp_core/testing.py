"""Test helpers for onecomp and its plugins (public, like the SDK): tiny random models of every
supported architecture, saved as Hugging Face folders with a small BPE tokenizer trained on the
bundled text, and pytest fixtures that build them once per session.

In a plugin's ``tests/conftest.py``::

    from onecomp_core.testing import tiny_llama, tiny_models  # noqa: F401  (pytest fixtures)
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

TEXT = Path(__file__).resolve().parent / "data" / "enwiki_excerpt.txt"

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=384, max_position_embeddings=1024)

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "mixtral"]


def configs(layers: int | None = None):
    """arch -> a tiny config (``layers`` decoder blocks instead of 2)."""
    from transformers import (Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, MixtralConfig,
                              Phi3Config, Qwen2Config, Qwen3Config)
    COMMON = {**globals()["COMMON"], **({"num_hidden_layers": layers} if layers else {})}
    return {
        "llama": LlamaConfig(**COMMON),
        "mistral": MistralConfig(**COMMON, sliding_window=32),
        "qwen2": Qwen2Config(**COMMON),
        "qwen3": Qwen3Config(**COMMON, head_dim=16),
        "gemma2": Gemma2Config(**COMMON, head_dim=16, sliding_window=32),
        "gemma3": Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=32),
        "phi3": Phi3Config(**COMMON, pad_token_id=0),
        "mixtral": MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2),
    }


def tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=COMMON["vocab_size"], special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT.read_text(encoding="utf-8")[:60000]], trainer)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return fast


def make_model(arch: str, folder: Path, dtype=torch.float32, seed: int = 0, layers: int | None = None) -> Path:
    """A tiny random model of ``arch`` (one of ``ARCHS``; ``layers`` blocks, default 2) saved into ``folder``."""
    from transformers import AutoModelForCausalLM
    folder = Path(folder)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(configs(layers)[arch], dtype=dtype)
    with torch.no_grad():   # a little structure so that quantization errors are not all alike
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(1 + torch.rand(1, p.shape[1], dtype=p.dtype) * 3)
    model.save_pretrained(folder)
    tokenizer(folder)
    return folder


def as_pipeline_sees_it(model):
    """An in-memory transformers model with its blocks as onecomp's pipeline sees them (the
    adapter's ``prepare_block``: fused MoE experts split into one linear per expert, carrying the
    fused weights), to apply a preprocessor's transform to and compare logits. -> the model."""
    from .adapters import find_adapter
    from .plugins import load_plugins
    adapter = find_adapter(model.config, load_plugins().registry)
    layers = model.get_submodule(adapter.blocks_path())
    for i in range(len(layers)):
        fused = getattr(getattr(layers[i], "mlp", None), "experts", None)
        layers[i] = adapter.prepare_block(layers[i])
        split = layers[i].mlp.experts if fused is not None else None
        if split is not None and split is not fused:
            with torch.no_grad():
                for e, ex in enumerate(split):
                    gate, up = fused.gate_up_proj[e].chunk(2, 0)
                    ex.gate_proj.weight.copy_(gate)
                    ex.up_proj.weight.copy_(up)
                    ex.down_proj.weight.copy_(fused.down_proj[e])
    return model


def spying(preprocessor: type, name: str):
    """A plugin registering ``preprocessor`` under ``name``, recording each transform its ``fit``
    returns: -> (plugin, list of fitted transforms). For tests that apply or inspect the
    transform a pipeline run fitted."""
    from .sdk import hookimpl
    seen: list = []

    def fit(self, ctx):
        t = preprocessor.fit(self, ctx)
        seen.append(t)
        return t
    spy = type(f"Spy{preprocessor.__name__}", (preprocessor,), {"name": name, "fit": fit})

    class Plugin:
        @hookimpl
        def onecomp_register_preprocessors(self, registry):
            registry.add_preprocessor(spy)
    return Plugin(), seen


def quick(**kw) -> dict:
    """Keyword arguments for a fast ``onecomp_core.quantize`` call on a tiny model."""
    base = dict(bits=4, group_size=32, projector="rtn", num_samples=2, seq_len=32)
    base.update(kw)
    return base


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


def installed(kind: str, name: str) -> bool:
    """Whether an installed plugin registers component ``name`` of ``kind``."""
    from .plugins import load_plugins
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = load_plugins().registry
    return name in _REGISTRY.names(kind)


_REGISTRY = None


def requires(kind: str, name: str):
    """A pytest mark skipping a test when component ``name`` is not installed (a plugin's tests
    that also exercise another plugin it does not depend on)."""
    return pytest.mark.skipif(not installed(kind, name), reason=f"{kind} {name!r} is not installed")


def cli(argv: list[str]) -> int:
    """The ``onecomp`` command in-process (for plugin tests): its exit status."""
    from .cli import main
    return main(argv)


def pytest_configure(config):
    """Markers of onecomp's tests (a plugin's conftest imports this hook with its fixtures)."""
    config.addinivalue_line("markers", "whole_suite: heavy (a SIGKILL and a re-run); runs in the whole suite, "
                                       "not again in each distribution's isolated check (scripts/check_dists.sh)")
