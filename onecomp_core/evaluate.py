"""Perplexity on a text file (strided windows) and mean KL divergence of next-token
distributions against a reference model."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import OnecompError


def text_tokens(tokenizer, path, max_tokens: int | None = None) -> torch.Tensor:
    p = Path(path)
    if not p.is_file():
        raise OnecompError(f"evaluation text {p} does not exist")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise OnecompError(f"evaluation text {p} is empty")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if max_tokens:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise OnecompError(f"evaluation text {p} has fewer than 2 tokens")
    return ids


def _windows(n: int, seq_len: int, stride: int):
    """(begin, end, first scored position) of each window; every token after the first is
    scored once, with up to seq_len - stride tokens of context carried over."""
    begin = 0
    prev_end = 0
    while prev_end < n:
        end = min(begin + seq_len, n)
        yield begin, end, prev_end - begin
        prev_end = end
        if end == n:
            break
        begin = end - (seq_len - stride) if stride < seq_len else end


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, ref=None, seq_len: int = 512, stride: int | None = None,
             device=None, bos: int | None = None) -> dict:
    """{ppl, tokens} and, with ``ref``, {ppl_ref, kl} (mean KL(P_ref || P_model) per token).
    With ``bos``, every window is that token then seq_len - 1 tokens of text, and the first text
    token is scored too (predicted from the BOS alone)."""
    text_len = seq_len - (bos is not None)
    stride = min(stride or text_len, text_len)
    if not 0 < stride <= text_len:
        raise OnecompError(f"stride must be in (0, seq_len], got {stride}")
    device = device or next(model.parameters()).device
    nll, kl, nll_ref, count = 0.0, 0.0, 0.0, 0
    for begin, end, first in _windows(ids.numel(), text_len, stride):
        x = ids[begin:end]
        if bos is not None:
            x = torch.cat([torch.tensor([bos], dtype=x.dtype), x])
        x = x[None].to(device)
        logits = model(input_ids=x).logits[0, :-1].float()
        target = x[0, 1:]
        if bos is not None:
            lo = first                   # target j is text position begin + j
        else:
            lo = max(first - 1, 0) if begin > 0 else 0
        logp = F.log_softmax(logits[lo:], -1)
        tgt = target[lo:]
        nll += float(-logp.gather(1, tgt[:, None]).sum())
        count += tgt.numel()
        if ref is not None:
            rl = F.log_softmax(ref(input_ids=x.to(next(ref.parameters()).device)).logits[0, :-1].float()[lo:], -1)
            rl = rl.to(logp.device)
            nll_ref += float(-rl.gather(1, tgt[:, None]).sum())
            kl += float((rl.exp() * (rl - logp)).sum())
    out = {"ppl": math.exp(nll / count), "tokens": count}
    if ref is not None:
        out.update({"ppl_ref": math.exp(nll_ref / count), "kl": kl / count})
    return out


def load_reference(model_spec: str, device: str = "auto", dtype: str = "auto"):
    """The full-precision model (folder, GGUF file or hub id) for perplexity and KL."""
    from transformers import AutoModelForCausalLM
    from .lazy_weights import LazyWeights
    from .model_source import resolve_model
    from .skeleton import compute_dtype, pick_device
    folder = resolve_model(model_spec)
    dev = pick_device(device)
    dt = compute_dtype(LazyWeights(folder).dtype(), dev, dtype)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dt).to(dev).eval()
    return model, folder
