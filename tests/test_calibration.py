import json

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

from onecomp_core.calibration import calibration_samples, read_documents, select
from onecomp_core.errors import OnecompError


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from onecomp_core.testing import tokenizer
    return tokenizer(tmp_path_factory.mktemp("tok"))


def docs(n=6, length=50):
    return [list(range(i * 1000, i * 1000 + length + i)) for i in range(n)]


def test_concat_chunk_takes_consecutive_chunks():
    ids = select(docs(), 3, 40, "concat_chunk", 0)
    flat = [t for d in docs() for t in d]
    assert ids.shape == (3, 40) and ids.flatten().tolist() == flat[:120]


@pytest.mark.parametrize("strategy", ["drop_head", "drop_rand"])
def test_drop_strategies_are_seeded(strategy):
    a = select(docs(), 4, 50, strategy, 7)
    b = select(docs(), 4, 50, strategy, 7)
    c = select(docs(), 4, 50, strategy, 8)
    assert a.shape == (4, 50) and torch.equal(a, b) and not torch.equal(a, c)
    if strategy == "drop_head":
        assert all(int(r[0]) % 1000 == 0 for r in a)      # each sample starts its document


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 6), spread=st.integers(1, 6), strategy=st.sampled_from(["concat_chunk", "drop_head", "drop_rand"]),
       seed=st.integers(0, 3))
def test_heldout_samples_are_spread_disjoint_and_leave_the_first_ones_alone(n, spread, strategy, seed):
    d, L = docs(14, 30), 30
    assume(n + spread <= (14 if strategy != "concat_chunk" else sum(map(len, d)) // L))
    ids = select(d, n, L, strategy, seed, spread)
    assert ids.shape == (n + spread, L)
    assert torch.equal(ids[:n], select(d, n, L, strategy, seed))          # the training samples do not move
    rows = [tuple(r.tolist()) for r in ids]
    assert len(set(rows)) == n + spread                                  # none repeated, none trained on
    if strategy == "concat_chunk":
        flat = [t for x in d for t in x]
        starts = [flat.index(r[0]) // L for r in rows[n:]]
        have = len(flat) // L
        assert starts == sorted(starts) and starts[0] >= n               # after the first n, in order,
        assert starts[-1] >= n + (have - n) * (2 * spread - 1) // (2 * spread)   # reaching the end of the text
    else:
        firsts = {r[0] // 1000 for r in rows}                            # one document each
        assert len(firsts) == n + spread


def test_not_enough_text_is_a_clear_error():
    with pytest.raises(OnecompError, match="shorter than one sample"):
        select([[1, 2, 3]], 1, 8, "concat_chunk", 0)
    with pytest.raises(OnecompError, match="gives 1 samples of 8 tokens, 5 asked"):
        select([list(range(10))], 5, 8, "concat_chunk", 0)
    with pytest.raises(OnecompError, match="needs 9 documents"):
        select(docs(), 9, 50, "drop_head", 0)
    with pytest.raises(OnecompError, match=r"gives 7 samples of 40 tokens, 8 asked \(3 held out\)"):
        select(docs(), 5, 40, "concat_chunk", 0, spread=3)


def test_sources_txt_jsonl_parquet_and_datasets(tmp_path, tok):
    text = "First paragraph here.\n\nSecond one, a bit longer than the first.\n\n"
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in text.split("\n\n") if t))
    import datasets
    ds = datasets.Dataset.from_dict({"text": [t for t in text.split("\n\n") if t]})
    ds.to_parquet(str(tmp_path / "a.parquet"))
    ds.save_to_disk(str(tmp_path / "ds"))
    want = ["First paragraph here.", "Second one, a bit longer than the first."]
    for src in ("a.txt", "a.jsonl", "a.parquet", "ds"):
        assert read_documents(str(tmp_path / src)) == want, src
    with pytest.raises(OnecompError, match="no 'content' field"):
        read_documents(str(tmp_path / "a.jsonl"), text_field="content")


def test_samples_are_cached(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("ONECOMP_CACHE", str(tmp_path / "cache"))
    a = calibration_samples(None, tok, 4, 64)
    assert a.shape == (4, 64)
    assert len(list((tmp_path / "cache" / "calibration").glob("*.pt"))) == 1
    b = calibration_samples(None, tok, 4, 64)
    assert torch.equal(a, b)


def test_too_few_calibration_tokens_for_a_hessian_are_flagged():
    from onecomp_core.runner import few_tokens_warning
    assert few_tokens_warning(16384, 1536) is None
    msg = few_tokens_warning(4096, 1536)
    assert "4096 tokens" in msg and "1536" in msg and "--num-samples" in msg


def test_cache_is_keyed_by_content_not_by_name_size_or_time(tmp_path, tok, monkeypatch):
    """A calibration file rewritten with other text of the same size and modification time, or a
    tokenizer that splits differently under the same name, gives new samples, not the cached ones."""
    import os
    from onecomp_core import hashing
    monkeypatch.setenv("ONECOMP_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "c.txt"
    f.write_text("alpha betas gamma delta " * 200)
    a = calibration_samples(str(f), tok, 2, 32)
    st = f.stat()
    f.write_text("omega sigma kappa theta " * 200)          # same length, other words
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    hashing.clear_memo()                                  # a new process would not remember the old digest
    b = calibration_samples(str(f), tok, 2, 32)
    assert not torch.equal(a, b)
    assert len(list((tmp_path / "cache" / "calibration").glob("*.pt"))) == 2
    assert torch.equal(calibration_samples(str(f), tok, 2, 32), b)   # and that one is now cached


def test_digests_follow_content():
    from onecomp_core.hashing import tensor_digest
    x = torch.arange(6, dtype=torch.int64)
    assert tensor_digest(x) == tensor_digest(x.clone())
    assert tensor_digest(x) != tensor_digest(x.reshape(2, 3)) != tensor_digest(x.to(torch.int32))
    y = x.clone()
    y[3] = 7
    assert tensor_digest(x) != tensor_digest(y)


@pytest.mark.parametrize("strategy", ["concat_chunk", "drop_head"])
def test_available_samples_is_what_the_sampler_can_draw(tok, tmp_path, strategy):
    from onecomp_core.calibration import available_samples
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(f"document {i} " + "word " * (30 + 7 * i) for i in range(12)))
    have = available_samples(str(text), tok, 24, strategy, bos=None)
    assert have >= 2
    assert calibration_samples(str(text), tok, have, 24, strategy, use_cache=False).shape == (have, 24)
    with pytest.raises(OnecompError, match="give more text|calibration text has"):
        calibration_samples(str(text), tok, have + 1, 24, strategy, use_cache=False)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 200), refine=st.integers(0, 300), heldout=st.integers(0, 20),
       available=st.one_of(st.none(), st.integers(1, 2000)))
def test_refine_counts_auto_is_four_times_the_pass_up_to_128_and_fits_the_source(n, refine, heldout, available):
    from types import SimpleNamespace
    from onecomp_core.runner import refine_counts
    cal = SimpleNamespace(num_samples=n, refine_samples=refine, heldout=heldout)
    train, held = refine_counts(cal, available)
    assert held == (heldout or max(1, -(-train // 10))) and train >= n
    if refine:
        assert train == max(refine, n)                      # asked for: exactly that (the source must give it)
    else:
        auto = min(4 * n, max(128, n))
        assert train <= auto
        if available is None or auto + (heldout or max(1, -(-auto // 10))) <= available:
            assert train == auto
        elif train > n:
            assert train + held <= available                  # the most the source gives
