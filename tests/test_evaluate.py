import math

import torch

from onecomp_core.evaluate import _windows, evaluate


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
