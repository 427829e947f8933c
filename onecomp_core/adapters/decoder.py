"""One adapter for Llama-like decoders: Llama, Mistral, Qwen2, Qwen3, Gemma 2/3, Phi-3 (fused
qkv and gate_up), and Mixtral (experts split into one linear per expert)."""
from __future__ import annotations

import re

import torch
import torch.nn as nn

from .base import ModelAdapter, ResidualLayout

ATTN_IN = ("q_proj", "k_proj", "v_proj", "qkv_proj")
ATTN_OUT = ("o_proj",)
MLP_IN = ("gate_proj", "up_proj", "gate_up_proj")
MLP_OUT = ("down_proj",)


class ExpertMLP(nn.Module):
    def __init__(self, hidden: int, inter: int, act, dtype, device):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False, dtype=dtype, device=device)
        self.up_proj = nn.Linear(hidden, inter, bias=False, dtype=dtype, device=device)
        self.down_proj = nn.Linear(inter, hidden, bias=False, dtype=dtype, device=device)
        self.act_fn = act

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class SplitExperts(nn.ModuleList):
    """Drop-in for transformers' fused experts (3-D gate_up/down tensors): one ExpertMLP per
    expert, same routing arithmetic, so every expert is an ordinary linear to quantize."""

    @classmethod
    def from_fused(cls, fused: nn.Module) -> "SplitExperts":
        E, two_i, h = fused.gate_up_proj.shape
        dev, dt = fused.gate_up_proj.device, fused.gate_up_proj.dtype
        return cls([ExpertMLP(h, two_i // 2, fused.act_fn, dt, dev) for _ in range(E)])

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token_idx, k_pos = torch.where(top_k_index == e)
            if token_idx.numel() == 0:
                continue
            y = expert(hidden_states[token_idx]) * top_k_weights[token_idx, k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


class DecoderAdapter(ModelAdapter):
    name = "decoder"
    model_types = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "mixtral")

    def prepare_block(self, block):
        for name, mod in list(block.named_modules()):
            if hasattr(mod, "gate_up_proj") and isinstance(getattr(mod, "gate_up_proj"), nn.Parameter) \
                    and getattr(mod, "gate_up_proj").dim() == 3:
                parent_name, _, child = name.rpartition(".")
                parent = block.get_submodule(parent_name) if parent_name else block
                setattr(parent, child, SplitExperts.from_fused(mod))
        return block

    def _linears(self, block):
        return [n for n, m in block.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1]
                in ATTN_IN + ATTN_OUT + MLP_IN + MLP_OUT]

    def linear_groups(self, block):
        names = self._linears(block)
        groups = [[n for n in names if n.rsplit(".", 1)[-1] in kind]
                  for kind in (ATTN_IN, ATTN_OUT, MLP_IN, MLP_OUT)]
        return [g for g in groups if g]

    def submodules(self, block):
        names = self._linears(block)
        pick = lambda *leaf: [n for n in names if n.rsplit(".", 1)[-1] in leaf]
        subs = {"qk": pick("q_proj", "k_proj") or pick("qkv_proj"),
                "vo": (pick("v_proj") or pick("qkv_proj")) + pick("o_proj"),
                "mlp": pick("gate_proj", "up_proj", "gate_up_proj", "down_proj")}
        return {k: v for k, v in subs.items() if v}

    def replayable(self, block):
        return ["self_attn"] if isinstance(getattr(block, "self_attn", None), nn.Module) else []

    def output_projection(self, block, name):
        proj = getattr(getattr(block, name, None), "o_proj", None) if name == "self_attn" else None
        return f"{name}.o_proj" if isinstance(proj, nn.Linear) else None

    def residual_taps(self, block):
        if hasattr(block, "post_feedforward_layernorm"):      # Gemma: outputs are normed before the add
            return {}
        taps = {}
        names = set(self._linears(block))
        if "self_attn.o_proj" in names and hasattr(block, "input_layernorm"):
            taps["self_attn.o_proj"] = "input_layernorm"          # its input is the block input
        if "mlp.down_proj" in names and hasattr(block, "post_attention_layernorm"):
            taps["mlp.down_proj"] = "post_attention_layernorm"    # its input is h + attention
        return taps

    def norm_inputs(self, block):
        names = self._linears(block)
        pick = lambda *leaf: [n for n in names if n.rsplit(".", 1)[-1] in leaf]
        mlp_norm = "pre_feedforward_layernorm" if hasattr(block, "pre_feedforward_layernorm") \
            else "post_attention_layernorm"                 # Gemma norms the attention output before the add
        router = ["mlp.gate"] if isinstance(getattr(getattr(block, "mlp", None), "experts", None), SplitExperts) else []
        out = {"input_layernorm": pick(*ATTN_IN), mlp_norm: router + pick(*MLP_IN)}
        return {k: v for k, v in out.items() if v and hasattr(block, k)}

    def norm_offset(self, block, norm):
        return 1.0 if self.config.model_type in ("gemma2", "gemma3_text") else 0.0

    def residual_layout(self, block):
        if hasattr(block, "post_feedforward_layernorm"):      # Gemma: writers' outputs are normed before the add
            return None
        names = self._linears(block)
        cfg = self.config
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        if "self_attn.v_proj" in names:
            value = ("self_attn.v_proj", 0)
        else:                                                  # fused qkv: v rows after q and k
            kv = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
            value = ("self_attn.qkv_proj", (cfg.num_attention_heads + kv) * head_dim)
        writers = [n for n in names if n.rsplit(".", 1)[-1] in ATTN_OUT + MLP_OUT]
        return ResidualLayout(norms=self.norm_inputs(block), offset=self.norm_offset(block, "input_layernorm"),
                              writers=writers, value=value, output="self_attn.o_proj", head_dim=head_dim)

    # transformers writes Mixtral checkpoints with the original expert names
    _MIXTRAL = [(r"\.mlp\.experts\.(\d+)\.gate_proj\.", r".block_sparse_moe.experts.\1.w1."),
                (r"\.mlp\.experts\.(\d+)\.down_proj\.", r".block_sparse_moe.experts.\1.w2."),
                (r"\.mlp\.experts\.(\d+)\.up_proj\.", r".block_sparse_moe.experts.\1.w3."),
                (r"\.mlp\.gate\.weight$", r".block_sparse_moe.gate.weight")]

    def checkpoint_keys(self, key):
        keys = [key]
        if self.config.model_type == "mixtral":
            for pat, rep in self._MIXTRAL:
                if re.search(pat, key):
                    keys.append(re.sub(pat, rep, key))
        return keys
