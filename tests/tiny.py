"""Tiny random models of every supported architecture, saved as Hugging Face folders with a
small BPE tokenizer trained on the bundled text, for fast tests."""
from __future__ import annotations

from pathlib import Path

import torch

TEXT = Path(__file__).resolve().parents[1] / "onecomp_core" / "data" / "enwiki_excerpt.txt"

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=384, max_position_embeddings=256)


def configs():
    from transformers import (Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, MixtralConfig,
                              Phi3Config, Qwen2Config, Qwen3Config)
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


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "mixtral"]


def tokenizer(folder: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=COMMON["vocab_size"], special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT.read_text(encoding="utf-8")[:60000]], trainer)
    from tokenizers import decoders
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return fast


def make_model(arch: str, folder: Path, dtype=torch.float32, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM
    folder = Path(folder)
    torch.manual_seed(seed)
    cfg = configs()[arch]
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    with torch.no_grad():   # a little structure so that quantization errors are not all alike
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(1 + torch.rand(1, p.shape[1], dtype=p.dtype) * 3)
    model.save_pretrained(folder)
    tokenizer(folder)
    return folder
