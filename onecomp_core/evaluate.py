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


def _window_inputs(ids: torch.Tensor, seq_len: int, stride: int | None, bos: int | None):
    """(input ids [1, T], first scored row) of each evaluation window. With ``bos``, every window
    is that token then seq_len - 1 tokens of text, and the first text token is scored too
    (predicted from the BOS alone)."""
    text_len = seq_len - (bos is not None)
    stride = min(stride or text_len, text_len)
    if not 0 < stride <= text_len:
        raise OnecompError(f"stride must be in (0, seq_len], got {stride}")
    for begin, end, first in _windows(ids.numel(), text_len, stride):
        x = ids[begin:end]
        if bos is not None:
            x = torch.cat([torch.tensor([bos], dtype=x.dtype), x])
            lo = first                   # target j is text position begin + j
        else:
            lo = max(first - 1, 0) if begin > 0 else 0
        yield x[None], lo


def _row_chunks(n: int, vocab: int, budget_floats: int = 1 << 23):
    """Row slices whose [rows, vocab] float32 log-probabilities stay within ~32 MB each."""
    step = max(1, budget_floats // max(vocab, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _nll(logits: torch.Tensor, tgt: torch.Tensor) -> float:
    """Summed negative log-likelihood of ``tgt`` under ``logits`` [n, V], a chunk of rows at a time."""
    total = 0.0
    for c in _row_chunks(logits.shape[0], logits.shape[-1]):
        lp = F.log_softmax(logits[c].float(), -1)
        total += float(-lp.gather(1, tgt[c, None]).sum())
    return total


class ReferenceLogProbs:
    """What evaluation needs of the reference model, measured in one pass over the windows so that
    the reference need not stay resident while the evaluated model runs: its summed NLL, and per
    window the input of its output head (hidden states of the scored rows, kept on the CPU) with
    the head's weight and bias, from which its log-probabilities are recomputed exactly, a chunk of
    rows at a time. A model whose logits are not its head's output (it post-processes them, or has
    no plain linear head) is kept whole instead (``model``), as both models were before."""

    def __init__(self, ref, ids: torch.Tensor, seq_len: int, stride: int | None, bos: int | None):
        self.key = (ids.numel(), int(ids.sum()), seq_len, stride, bos)
        self.nll, self.count, self.hidden = 0.0, 0, []
        self.weight = self.bias = self.model = None
        head = ref.get_output_embeddings() if hasattr(ref, "get_output_embeddings") else None
        if not isinstance(head, torch.nn.Linear):
            self.model = ref
        captured = []
        hook = head.register_forward_hook(lambda m, inp, out: captured.append(inp[0])) if self.model is None else None
        device = next(ref.parameters()).device
        try:
            for x, lo in _window_inputs(ids, seq_len, stride, bos):
                captured.clear()
                x = x.to(device)
                logits = ref(input_ids=x).logits[0, :-1]
                tgt = x[0, 1:][lo:]
                self.nll += _nll(logits[lo:], tgt)
                self.count += tgt.numel()
                if self.model is not None:
                    continue
                ok = bool(captured) and captured[0].shape[1] == x.shape[1]
                if ok and not self.hidden:   # the head alone gives the logits (no softcapping, scaling, ...)
                    ok = torch.equal(head(captured[0])[0, :-1].float(), logits.float())
                if not ok:
                    self.model, self.hidden = ref, []
                    continue
                self.hidden.append(captured[0][0, :-1][lo:].detach().cpu())
        finally:
            if hook is not None:
                hook.remove()
        if self.model is None:   # copies: a view would keep the whole model's (mapped) weights resident
            self.weight = head.weight.detach().clone()
            self.bias = head.bias.detach().clone() if head.bias is not None else None

    def share_head(self, model) -> None:
        """Use the evaluated model's output head where it holds the same weights (a head left in
        full precision), so that only one copy is resident."""
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        w = getattr(head, "weight", None)
        if self.weight is not None and isinstance(w, torch.Tensor) and w.shape == self.weight.shape \
                and w.dtype == self.weight.dtype and torch.equal(w.detach().to(self.weight.device), self.weight):
            self.weight = w.detach()

    def log_probs(self, window: int, rows: slice, device) -> torch.Tensor:
        """The reference's log-probabilities of ``rows`` of the scored rows of ``window``."""
        h = self.hidden[window][rows].to(device=self.weight.device, dtype=self.weight.dtype)
        b = self.bias.to(h.device) if self.bias is not None else None
        return F.log_softmax(F.linear(h, self.weight, b).float(), -1).to(device)


@torch.no_grad()
def reference_log_probs(ref, ids: torch.Tensor, seq_len: int = 512, stride: int | None = None,
                        bos: int | None = None) -> ReferenceLogProbs:
    """One pass of the reference model over the evaluation windows (see ReferenceLogProbs): the
    caller may then drop the reference and load the model to evaluate."""
    return ReferenceLogProbs(ref, ids, seq_len, stride, bos)


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, ref=None, seq_len: int = 512, stride: int | None = None,
             device=None, bos: int | None = None) -> dict:
    """{ppl, tokens} and, with ``ref`` (a model, or its ReferenceLogProbs from reference_log_probs
    with the same windows), {ppl_ref, kl} (mean KL(P_ref || P_model) per token). With ``bos``,
    every window is that token then seq_len - 1 tokens of text, and the first text token is scored
    too (predicted from the BOS alone)."""
    device = device or next(model.parameters()).device
    with _dense_weights_dropped(model):
        return _evaluate(model, ids, ref, seq_len, stride, device, bos)


class _dense_weights_dropped:
    """While evaluating, quantized modules that keep a dequantized copy of their weight between
    calls (``keep_dense``) dequantize per call instead: a float copy of every weight would
    cost as much memory as the full-precision model, for a few seconds of dequantization saved."""

    def __init__(self, model):
        self.mods = [m for m in model.modules() if getattr(m, "keep_dense", False) is True]

    def __enter__(self):
        for m in self.mods:
            m.keep_dense = False

    def __exit__(self, *exc):
        for m in self.mods:
            del m.keep_dense            # back to the class default


def _evaluate(model, ids, ref, seq_len, stride, device, bos) -> dict:
    if ref is not None and not isinstance(ref, ReferenceLogProbs):
        ref = ReferenceLogProbs(ref, ids, seq_len, stride, bos)
    if ref is not None:
        if ref.key != (ids.numel(), int(ids.sum()), seq_len, stride, bos):
            raise OnecompError("the reference's log-probabilities were measured on other windows than this "
                               "evaluation's: measure them with the same ids, seq_len, stride and bos")
        ref.share_head(model)
    nll, kl, count = 0.0, 0.0, 0
    for w, (x, lo) in enumerate(_window_inputs(ids, seq_len, stride, bos)):
        x = x.to(device)
        logits = model(input_ids=x).logits[0, :-1][lo:]
        tgt = x[0, 1:][lo:]
        full_ref = None
        if ref is not None and ref.model is not None:
            full_ref = ref.model(input_ids=x.to(next(ref.model.parameters()).device)).logits[0, :-1][lo:]
        for c in _row_chunks(logits.shape[0], logits.shape[-1]):
            logp = F.log_softmax(logits[c].float(), -1)
            nll += float(-logp.gather(1, tgt[c, None]).sum())
            if ref is None:
                continue
            rl = (F.log_softmax(full_ref[c].float(), -1).to(logp.device) if full_ref is not None
                  else ref.log_probs(w, c, logp.device))
            kl += float((rl.exp() * (rl - logp)).sum())       # KL(P_ref || P_model), summed over rows
        count += tgt.numel()
    out = {"ppl": math.exp(nll / count), "tokens": count}
    if ref is not None:
        out.update({"ppl_ref": math.exp(ref.nll / ref.count), "kl": kl / count})
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
