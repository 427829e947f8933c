import json
import math
import re

import pytest
import torch

from onecomp_core.errors import OnecompError

from onecomp_core.evaluate import _windows, evaluate
from onecomp_core.testing import ARCHS


def test_windows_score_every_token_once():
    """Strided windows score every token after the first exactly once; non-overlapping windows
    (stride = seq_len) every token but each window's first."""
    for n, L, s in [(100, 32, 32), (100, 32, 16), (33, 32, 8), (5, 32, 32)]:
        scored = []
        for b, e, first in _windows(n, L, s):
            assert e - b <= L
            scored += list(range(b + max(first, 1), e))
        assert scored == [t for t in range(1, n) if s < L or t % L != 0], (n, L, s)


class Uniform(torch.nn.Module):
    """A 'model' predicting the uniform distribution over V tokens: perplexity exactly V."""
    def __init__(self, V):
        super().__init__()
        self.V = V
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        class O:
            pass
        o = O()
        o.logits = torch.zeros(*input_ids.shape, self.V)
        return o


def test_perplexity_and_kl_values(tiny_llama):
    ids = torch.randint(0, 50, (300,))
    r = evaluate(Uniform(50), ids, ref=Uniform(50), seq_len=64)
    assert math.isclose(r["ppl"], 50, rel_tol=1e-5) and abs(r["kl"]) < 1e-6 and r["tokens"] == 299 - 4
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    ids = torch.randint(3, 384, (130,))
    r = evaluate(m, ids, ref=m, seq_len=64)
    assert abs(r["kl"]) < 1e-6 and math.isclose(r["ppl"], r["ppl_ref"])
    with torch.no_grad():     # same number from a direct computation over the two windows
        nll, n = 0.0, 0
        for b in (0, 64, 128):
            x = ids[b:b + 64][None]
            lp = torch.log_softmax(m(input_ids=x).logits[0, :-1], -1)
            nll -= float(lp.gather(1, x[0, 1:, None]).sum())
            n += x.shape[1] - 1
    assert math.isclose(r["ppl"], math.exp(nll / n), rel_tol=1e-5)


def test_with_bos_every_window_starts_with_it_and_every_token_is_scored(tiny_llama):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    ids = torch.randint(3, 384, (130,))
    seen = []
    real = m.model.forward           # the base model runs on every window (the full model on the first)

    def spy(*a, **kw):
        x = kw["input_ids"][0].clone()
        if not seen or not torch.equal(seen[-1], x):
            seen.append(x)
        return real(*a, **kw)

    m.model.forward = spy
    r = evaluate(m, ids, seq_len=64, bos=1)
    assert r["tokens"] == 130                                   # the first text token is scored too
    assert all(int(x[0]) == 1 and x.numel() <= 64 for x in seen)
    assert torch.equal(torch.cat([x[1:] for x in seen]), ids)   # windows of 63 text tokens, in order
    with torch.no_grad():
        nll = 0.0
        for b in range(0, 130, 63):
            x = torch.cat([torch.tensor([1]), ids[b:b + 63]])[None]
            lp = torch.log_softmax(m(input_ids=x).logits[0, :-1], -1)
            nll -= float(lp.gather(1, x[0, 1:, None]).sum())
    assert math.isclose(r["ppl"], math.exp(nll / 130), rel_tol=1e-5)


def test_calibration_and_evaluation_follow_a_tokenizer_that_adds_bos(tiny_llama, tmp_path):
    import json
    import shutil
    import onecomp_core
    from transformers import AutoTokenizer
    from onecomp_core.calibration import bos_id, calibration_samples
    plain = AutoTokenizer.from_pretrained(str(tiny_llama))
    assert bos_id(plain) is None and bos_id(plain, "yes") == plain.bos_token_id and bos_id(plain, "no") is None
    model = tmp_path / "bos"
    shutil.copytree(tiny_llama, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": True}))
    from tokenizers import processors
    tok = AutoTokenizer.from_pretrained(str(model))
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save_pretrained(str(model))
    tok = AutoTokenizer.from_pretrained(str(model))
    assert bos_id(tok) == 1
    ids = calibration_samples(None, tok, 3, 32, use_cache=False, bos=1)
    assert ids.shape == (3, 32) and (ids[:, 0] == 1).all() and (ids[:, 1:] != 1).all()
    text = tmp_path / "eval.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    rep = onecomp_core.quantize(model, tmp_path / "q", projector="rtn", num_samples=2, seq_len=32,
                                eval_text=str(text), config={"eval_seq_len": 64})
    n = len(tok(text.read_text(), add_special_tokens=False)["input_ids"])
    assert rep["evaluation"]["tokens"] == n                      # every token scored, BOS in front


def _kl_both_resident(m, ref, ids, seq_len, bos=None):
    """The mean KL with both models run on each window, the whole vocabulary at once."""
    from onecomp_core.evaluate import _window_inputs
    kl, n = 0.0, 0
    with torch.no_grad():
        for x, lo in _window_inputs(ids, seq_len, None, bos):
            lp = torch.log_softmax(m(input_ids=x).logits[0, :-1][lo:].float(), -1)
            rl = torch.log_softmax(ref(input_ids=x).logits[0, :-1][lo:].float(), -1)
            kl += float((rl.exp() * (rl - lp)).sum())
            n += lp.shape[0]
    return kl / n


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_reference_measured_first_then_dropped_gives_the_same_kl(tiny_models, arch):
    """The reference's pass alone (hidden states into its head, or the whole model where the head
    alone does not give its logits: gemma2 caps them) then the evaluated model alone = both models
    on every window; and a small row budget (many chunks) changes nothing."""
    import gc
    import weakref
    from transformers import AutoModelForCausalLM
    from onecomp_core import evaluate as ev
    ref = AutoModelForCausalLM.from_pretrained(tiny_models(arch)).eval()
    m = AutoModelForCausalLM.from_pretrained(tiny_models(arch)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.add_(torch.randn_like(p) * 0.02)
    ids = torch.randint(3, 384, (200,))
    want = _kl_both_resident(m, ref, ids, 64)
    cache = ev.reference_log_probs(ref, ids, seq_len=64)
    capped = getattr(ref.config, "final_logit_softcapping", None) is not None
    assert (cache.model is ref) == capped and (len(cache.hidden) == 4) != capped
    alive = weakref.ref(ref)
    del ref
    gc.collect()
    assert (alive() is None) != capped                          # only the head (and hidden states) kept
    r = ev.evaluate(m, ids, ref=cache, seq_len=64)
    assert math.isclose(r["kl"], want, rel_tol=1e-4, abs_tol=1e-7) and r["kl"] > 1e-4
    old = ev._row_chunks
    ev._row_chunks = lambda n, v, budget_floats=1 << 23: old(n, v, budget_floats=v * 5)
    try:
        assert math.isclose(ev.evaluate(m, ids, ref=cache, seq_len=64)["kl"], want, rel_tol=1e-4)
    finally:
        ev._row_chunks = old
    with pytest.raises(OnecompError, match="other windows"):
        ev.evaluate(m, ids, ref=cache, seq_len=32)


def test_evaluation_keeps_no_dense_copy_of_the_quantized_weights(tiny_llama, tmp_path):
    """While evaluating, quantized modules dequantize per call (no float copy of every weight
    resident); afterwards they cache again, and the numbers are those of a caching forward."""
    import onecomp_core
    from onecomp_core.formats.uniform import QuantLinear
    onecomp_core.quantize(tiny_llama, tmp_path / "q", projector="rtn", num_samples=2, seq_len=32)
    m = onecomp_core.load_quantized(tmp_path / "q", "cpu")
    mods = [x for x in m.modules() if isinstance(x, QuantLinear)]
    ids = torch.randint(3, 384, (100,))
    seen = []
    real = mods[0].forward

    def spy(x):
        out = real(x)
        seen.append(mods[0]._dense)
        return out

    mods[0].forward = spy
    r = evaluate(m, ids, seq_len=64)
    assert seen and all(d is None for d in seen)
    assert all(x.keep_dense for x in mods) and "keep_dense" not in vars(mods[1])
    with torch.no_grad():                        # a caching forward gives the same perplexity
        nll, n = 0.0, 0
        for b in (0, 64):
            x = ids[b:b + 64][None]
            lp = torch.log_softmax(m(input_ids=x).logits[0, :-1], -1)
            nll -= float(lp.gather(1, x[0, 1:, None]).sum())
            n += x.shape[1] - 1
    assert mods[1]._dense is not None
    assert math.isclose(r["ppl"], math.exp(nll / n), rel_tol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_reference_block_by_block_equals_the_model_whole(tiny_models, arch, monkeypatch):
    """The streamed reference pass (one block resident at a time; windows of two lengths; strided
    and BOS windows) measures what the model held whole does; gemma2's capped logits send it to
    the whole model before any block is loaded."""
    from transformers import AutoModelForCausalLM
    from onecomp_core import evaluate as ev
    from onecomp_core.reference_pass import measure_reference
    from onecomp_core.skeleton import Skeleton
    real_block, resident = Skeleton.block, []

    def block(sk, i):
        resident.append(sum(any(not p.is_meta for p in b.parameters()) for b in sk.blocks))
        return real_block(sk, i)

    monkeypatch.setattr(Skeleton, "block", block)
    folder = tiny_models(arch)
    ref = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(3, 384, (200,))
    capped = getattr(ref.config, "final_logit_softcapping", None) is not None
    for stride, bos in [(None, None), (40, 1)]:
        whole = ev.reference_log_probs(ref, ids, seq_len=64, stride=stride, bos=bos)
        resident.clear()
        got = measure_reference(str(folder), ids, seq_len=64, stride=stride, bos=bos, device="cpu")
        assert (not resident) if capped else max(resident) == 0   # every other block on meta when one loads
        assert got.key == whole.key and got.count == whole.count
        assert math.isclose(got.nll, whole.nll, rel_tol=1e-5)
        assert (got.model is not None) == capped == (whole.model is not None)
        if not capped:
            assert torch.equal(got.weight, whole.weight) and len(got.hidden) == len(whole.hidden) >= 4
            for a, b in zip(got.hidden, whole.hidden):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_quantize_ends_with_one_summary_line(tiny_llama, tmp_path, capsys):
    from onecomp_core.cli import main
    text = tmp_path / "eval.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    assert main(["quantize", str(tiny_llama), "--out", str(tmp_path / "q"), "--projector", "rtn", "--num-samples", "2",
                 "--seq-len", "32", "--eval-text", str(text)]) == 0
    line, evaluation = capsys.readouterr().out.strip().splitlines()[-2:]
    ev = json.loads(evaluation)
    assert re.fullmatch(r"wrote .*/q: [0-9.]+ bits per weight, [0-9.]+ s, peak RSS [0-9.]+ MiB, "
                        r"ppl [0-9.]+ \(FP [0-9.]+\), KL [0-9.]+", line), line
    assert f"ppl {ev['ppl']:.3f} (FP {ev['ppl_ref']:.3f}), KL {ev['kl']:.4f}" in line
