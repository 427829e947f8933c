"""Budgets in bits for the quantized linears: from an average bpw, a size in bytes, or the
memory of a device minus what inference needs besides the quantized weights."""
from __future__ import annotations

from onecomp_core.sdk import OnecompError, parse_size  # noqa: F401  (parse_size: part of this module's API)

def inference_overhead_bytes(config, context: int, batch: int, act_bytes: int = 2) -> dict:
    """What inference holds besides the quantized linears, at ``batch`` x ``context`` tokens:
      kv_cache    = 2 (K and V) x layers x kv_heads x head_dim x context x batch x act_bytes
      activations = batch x context x (4 hidden + 2 intermediate) x act_bytes   (one layer's
                    hidden states, attention output and MLP intermediates at prefill)
                    + batch x vocab x 4                                          (fp32 logits of a step)
    """
    layers = int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    hidden = int(config.hidden_size)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    inter = int(getattr(config, "intermediate_size", None) or 4 * hidden)
    vocab = int(config.vocab_size)
    kv = 2 * layers * kv_heads * head_dim * context * batch * act_bytes
    act = batch * context * (4 * hidden + 2 * inter) * act_bytes + batch * vocab * 4
    return {"kv_cache": kv, "activations": act}


def fit_memory_budget_bits(memory_bytes: int, config, other_params: int, context: int, batch: int,
                           act_bytes: int = 2) -> tuple[float, dict]:
    """Bits left for the quantized linears when ``memory_bytes`` must also hold the KV cache,
    the activations and the parameters that stay in 16-bit (embeddings, norms, head)."""
    over = inference_overhead_bytes(config, context, batch, act_bytes)
    over["unquantized_params"] = other_params * act_bytes
    left = memory_bytes - sum(over.values())
    if left <= 0:
        raise OnecompError(f"{memory_bytes} bytes do not even hold the KV cache, activations and unquantized "
                           f"parameters ({sum(over.values())} bytes at context {context}, batch {batch}); "
                           f"lower --context or give more memory")
    return left * 8.0, over
