"""Perplexity on a text file (strided windows) and mean KL divergence of next-token
distributions against a reference model."""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import OnecompError
from .hashing import tensor_digest
from .resources import release_memory


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


def head_alone_gives_logits(logits: torch.Tensor, head_output: torch.Tensor) -> bool:
    """Whether a model's logits are its output head's output as is (no softcapping, scaling, ...),
    from both computed on the same short input."""
    logits, again = logits.float(), head_output.float()
    return again.shape == logits.shape and torch.allclose(again, logits, rtol=1e-5,
                                                          atol=1e-5 * (1.0 + float(logits.abs().max())))


class _Logits:
    """A causal LM's logits for the scored rows of a window, a chunk of rows at a time. Where
    the model's logits are its linear output head applied to its base model's last hidden
    states (checked on the first window against the full forward: no softcapping, scaling,
    ...), the base model runs and the head is applied per chunk, so no [rows, vocabulary] tensor
    is ever whole; otherwise the full forward's logits are sliced."""

    def __init__(self, model):
        self.model = model
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        base = getattr(model, getattr(model, "base_model_prefix", "") or "", None)
        self.head = head if isinstance(head, torch.nn.Linear) and isinstance(base, torch.nn.Module) else None
        self.base = base if self.head is not None else None
        self.checked = self.head is None
        self.device = next(model.parameters()).device

    def _hidden(self, x, lo):
        return self.base(input_ids=x, use_cache=False).last_hidden_state[0, :-1][lo:]

    def _head_alone_gives_logits(self, x: torch.Tensor) -> bool:
        """The model's logits of a short prefix against its head applied to its base model's
        hidden states of the same prefix (no [rows, vocabulary] tensor of a whole window)."""
        x = x[:, :64]
        return head_alone_gives_logits(self.model(input_ids=x).logits[0],
                                       self.head(self._hidden(x, 0, drop_last=False)))

    def _hidden(self, x, lo, drop_last: bool = True):
        h = self.base(input_ids=x, use_cache=False).last_hidden_state[0]
        return (h[:-1] if drop_last else h)[lo:]

    def window(self, x: torch.Tensor, lo: int):
        """-> (the head's input for the scored rows, or None where the head is not used alone;
        rows -> float32 logits of those rows); sets ``vocab``, the logits' width."""
        x = x.to(self.device)
        if not self.checked:                      # once: does the head alone give the model's logits?
            self.checked = True
            if not self._head_alone_gives_logits(x):
                self.head = self.base = None
        if self.head is not None:
            h = self._hidden(x, lo)
            self.vocab = self.head.out_features
            return h, lambda c: self.head(h[c]).float()
        logits = self.model(input_ids=x).logits[0, :-1][lo:]
        self.vocab = logits.shape[-1]
        return None, lambda c: logits[c].float()


def _nll(rows, n: int, vocab: int, tgt: torch.Tensor) -> float:
    """Summed negative log-likelihood of ``tgt`` under the logits ``rows(chunk)``, by chunks."""
    total = 0.0
    for c in _row_chunks(n, vocab):
        lp = F.log_softmax(rows(c), -1)
        total += float(-lp.gather(1, tgt[c, None].to(lp.device)).sum())
    return total


def windows_key(ids: torch.Tensor, seq_len: int, stride: int | None, bos: int | None) -> tuple:
    """What identifies the evaluation windows: the ids' digest and the windowing."""
    return tensor_digest(ids), seq_len, stride, bos


class ReferenceLogProbs:
    """What evaluation needs of the reference model, measured in one pass over the windows so that
    the reference need not stay resident while the evaluated model runs: its summed NLL, and per
    window the input of its output head (hidden states of the scored rows, kept on the CPU) with
    a copy of the head's weight and bias, from which its log-probabilities are recomputed
    exactly, a chunk of rows at a time. A model whose logits are not its head's output (it
    post-processes them, or has no plain linear head) is kept whole instead (``model``).
    Filled by :meth:`of_model` (the model in memory) or ``reference_pass.measure_reference``
    (the checkpoint one block at a time)."""

    def __init__(self, ids: torch.Tensor, seq_len: int, stride: int | None, bos: int | None):
        self.key = windows_key(ids, seq_len, stride, bos)
        self.nll, self.count, self.hidden = 0.0, 0, []
        self.weight = self.bias = self.model = None

    def add_window(self, rows, vocab: int, tgt: torch.Tensor, hidden: torch.Tensor | None) -> None:
        """One window: the logits of its scored rows by chunks, their targets, the head's input."""
        self.nll += _nll(rows, tgt.numel(), vocab, tgt)
        self.count += tgt.numel()
        if hidden is not None:
            self.hidden.append(hidden.detach().cpu())

    def keep_head(self, head: torch.nn.Linear, copy: bool = True) -> None:
        """The head's weight and bias; copies where the model's tensors may be views of its
        memory-mapped file (a view would keep the whole file resident)."""
        keep = (lambda t: t.detach().clone()) if copy else (lambda t: t.detach())
        self.weight = keep(head.weight)
        self.bias = keep(head.bias) if head.bias is not None else None

    @classmethod
    @torch.no_grad()
    def of_model(cls, ref, ids: torch.Tensor, seq_len: int, stride: int | None, bos: int | None):
        """The pass of a reference model held in memory."""
        self = cls(ids, seq_len, stride, bos)
        logits = _Logits(ref)
        for x, lo in _window_inputs(ids, seq_len, stride, bos):
            h, rows = logits.window(x, lo)
            self.add_window(rows, logits.vocab, x[0, 1:][lo:], h)
        if logits.head is None:
            self.model, self.hidden = ref, []
        else:
            self.keep_head(logits.head)
        return self

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
    return ReferenceLogProbs.of_model(ref, ids, seq_len, stride, bos)


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
        ref = ReferenceLogProbs.of_model(ref, ids, seq_len, stride, bos)
    if ref is not None:
        if ref.key != windows_key(ids, seq_len, stride, bos):
            raise OnecompError("the reference's log-probabilities were measured on other windows than this "
                               "evaluation's: measure them with the same ids, seq_len, stride and bos")
        ref.share_head(model)
    logits, full_ref = _Logits(model), _Logits(ref.model) if ref is not None and ref.model is not None else None
    nll, kl, count = 0.0, 0.0, 0
    for w, (x, lo) in enumerate(_window_inputs(ids, seq_len, stride, bos)):
        _, rows = logits.window(x, lo)
        tgt = x[0, 1:][lo:].to(device)
        ref_rows = full_ref.window(x, lo)[1] if full_ref is not None else None
        n = tgt.numel()
        for c in _row_chunks(n, logits.vocab):
            logp = F.log_softmax(rows(c), -1)
            nll += float(-logp.gather(1, tgt[c, None].to(logp.device)).sum())
            if ref is None:
                continue
            rl = (F.log_softmax(ref_rows(c), -1).to(logp.device) if ref_rows is not None
                  else ref.log_probs(w, c, logp.device))
            kl += float((rl.exp() * (rl - logp)).sum())       # KL(P_ref || P_model), summed over rows
        count += n
        release_memory()        # per-call dequantization's freed pages would otherwise pile up in the heap
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
    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dt).to(dev).eval()
    return model, folder


@contextlib.contextmanager
def quiet_loading():
    """transformers' own per-tensor loading bar off while a model loads (the run's stages print
    their progress; the bar would break a one-line error that follows a load)."""
    from transformers.utils import logging as hf_logging
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()
