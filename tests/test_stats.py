import pytest
import torch

from onecomp_core.plugins import load_plugins
from onecomp_core.skeleton import Skeleton, pick_device
from onecomp_core.gather import input_diagonals, input_statistics
from onecomp_core.streams import capture


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_input_statistics_reduce_full_grams_once_per_shared_input(arch, tiny_models):
    """reduce(H) sees the full Gram of each input group once (q/k/v, gate/up share one), its
    diagonal equals the diagonal-only pass, and every member of the group gets the result."""
    sk = Skeleton(tiny_models(arch), load_plugins().registry, pick_device("cpu"))
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    inputs, kwargs = capture(sk, ids)
    diag = input_diagonals(sk, inputs, kwargs)
    calls = []

    def reduce(H):
        assert H.shape[0] == H.shape[1] and torch.allclose(H, H.T)
        calls.append(H.shape[0])
        return H.diagonal().clone()
    full = input_statistics(sk, inputs, kwargs, reduce)
    groups = sum(len(sk.adapter.linear_groups(sk.block(i))) for i in range(len(sk.blocks)))
    assert len(calls) == groups < len(full) == len(diag)
    for n in diag:
        assert torch.allclose(full[n], diag[n], rtol=1e-4, atol=1e-6), n


from hypothesis import given, settings, strategies as st  # noqa: E402

from onecomp_core.stats import Cross, Diag, Gram, Residual, from_state_dict  # noqa: E402


def _stat(kind, d, out=3):
    return {"gram": lambda: Gram.of(d, dtype=torch.float64), "cross": lambda: Cross.of(d, dtype=torch.float64),
            "residual": lambda: Residual.of(out, d, dtype=torch.float64),
            "diag": lambda: Diag.of(d, dtype=torch.float64)}[kind]()


def _feed(stat, kind, xs, xq, rs):
    for x, y, r in zip(xs, xq, rs):
        if kind in ("gram", "diag"):
            stat.add(x)
        elif kind == "cross":
            stat.add(x, y)
        else:
            stat.add(r, r * 0.5, y)


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(["gram", "cross", "residual", "diag"]), d=st.integers(1, 12),
       samples=st.lists(st.integers(1, 9), min_size=2, max_size=8), cut=st.integers(0, 100), seed=st.integers(0, 999))
def test_merging_two_halves_equals_one_pass(kind, d, samples, cut, seed):
    """What a distributed run will all-reduce: statistics of two disjoint parts of the
    calibration set, merged, equal one pass over the whole (sum and token count)."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, d, generator=g, dtype=torch.float64) for n in samples]
    xq = [x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64) for x in xs]
    rs = [torch.randn(x.shape[0], 3, generator=g, dtype=torch.float64) for x in xs]
    k = cut % (len(xs) + 1)
    whole, a, b = _stat(kind, d), _stat(kind, d), _stat(kind, d)
    _feed(whole, kind, xs, xq, rs)
    _feed(a, kind, xs[:k], xq[:k], rs[:k])
    _feed(b, kind, xs[k:], xq[k:], rs[k:])
    merged = a.merge(b)
    assert merged.n == whole.n == sum(samples)
    assert torch.allclose(merged.sum, whole.sum, rtol=1e-12, atol=1e-12)
    assert torch.allclose(merged.mean, whole.mean, rtol=1e-12, atol=1e-12)
    back = from_state_dict(merged.state_dict())                 # what travels between ranks or to disk
    assert type(back) is type(merged) and back.n == merged.n and torch.equal(back.sum, merged.sum)


@settings(max_examples=40, deadline=None)
@given(d=st.integers(1, 40), panel=st.integers(1, 16), batches=st.lists(st.integers(1, 7), min_size=1, max_size=4),
       seed=st.integers(0, 999))
def test_gram_sums_the_upper_panels_and_reads_back_the_full_symmetric_product(d, panel, batches, seed):
    """The Gram's upper-triangle update (row panels, fewer flops) reads back as the full X^T X,
    exactly symmetric, also after a merge, a state_dict round trip and further adds."""
    from unittest import mock
    import onecomp_core.stats as stats
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, d, generator=g, dtype=torch.float64) for n in batches]
    gram = Gram.of(d, dtype=torch.float64)
    with mock.patch.object(stats, "PANEL", panel):
        for x in xs:
            gram.add(x)
        X = torch.cat(xs)
        assert torch.allclose(gram.sum, X.T @ X, rtol=1e-12, atol=1e-12)
        assert torch.equal(gram.sum, gram.sum.T) and gram.n == X.shape[0]
        back = from_state_dict(gram.state_dict())
        back.add(xs[0])                                   # adds after a restore: the restored lower part is overwritten
        more = torch.cat([X, xs[0]])
        assert torch.allclose(back.sum, more.T @ more, rtol=1e-12, atol=1e-12) and torch.equal(back.sum, back.sum.T)
        assert torch.allclose(gram.merge(back).H, (X.T @ X + more.T @ more) / (X.shape[0] + more.shape[0]), rtol=1e-12)


def test_merge_refuses_another_kind_or_shape():
    from onecomp_core.errors import OnecompError
    with pytest.raises(OnecompError, match="cannot merge Cross"):
        Gram.of(4).merge(Cross.of(4))
    with pytest.raises(OnecompError, match=r"cannot merge Gram\(3, 3\)"):
        Gram.of(4).merge(Gram.of(3))


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_gathered_statistics_do_not_depend_on_the_batch_size(arch, tiny_models):
    """Blocks run on batches of samples, sums are still added per sample in order: every
    statistic comes out bit-identical whatever the batch size (dense blocks)."""
    import copy
    from onecomp_core.gather import gather_group
    sk = Skeleton(tiny_models(arch), load_plugins().registry, pick_device("cpu"))
    ids = torch.randint(3, 300, (5, 16), generator=torch.Generator().manual_seed(0))
    inputs, kwargs = capture(sk, ids)
    block = sk.block(0)
    fp_block = copy.deepcopy(block)
    with torch.no_grad():                                       # a "quantized" block and stream
        block.self_attn.q_proj.weight.mul_(1.01)
    q = inputs + 0.01 * torch.randn(inputs.shape, generator=torch.Generator().manual_seed(1))
    group = sk.adapter.linear_groups(block)[1]                  # o_proj: a residual writer where declared
    mods = {n: block.get_submodule(n) for n in group}
    taps = sk.adapter.residual_taps(block)
    runs = [gather_group(block, mods, q, kwargs[0], {"gram", "cross", "residual"}, b, fp_block=fp_block,
                         fp=inputs, taps=taps) for b in (1, 2, 5)]
    for n in mods:
        assert set(runs[0][n]) == ({"gram", "cross", "residual"} if n in taps else {"gram", "cross"})
        for other in runs[1:]:
            for kind, st_ in runs[0][n].items():
                assert other[n][kind].n == st_.n == 5 * 16 and torch.equal(other[n][kind].sum, st_.sum), (n, kind)


def test_a_run_gives_the_same_checkpoint_whatever_the_batch_size(tiny_llama, tmp_path):
    """Blocks forwarded 1 or 3 samples at a time (FP stream, quantized stream, paired statistics
    for QEP): the same bytes."""
    import onecomp_core
    from safetensors.torch import load_file
    kw = dict(bits=3, group_size=16, projector="rtn", refiners=["qep"], num_samples=5, seq_len=32)
    onecomp_core.quantize(tiny_llama, tmp_path / "a", batch_size=1, **kw)
    onecomp_core.quantize(tiny_llama, tmp_path / "b", batch_size=3, **kw)
    for f in ("model-block-00000.safetensors", "model-block-00001.safetensors"):
        a, b = load_file(str(tmp_path / "a" / f)), load_file(str(tmp_path / "b" / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f


@pytest.mark.parametrize("arch", ["llama", "phi3", "mixtral"])
def test_linears_reading_one_input_share_one_gram_equal_to_each_alone(arch, tiny_models, monkeypatch):
    """q/k/v (gate/up, each expert's gate/up) read the same tensor: its Gram is summed once and
    every linear gets its own copy, bit-identical to gathering that linear alone."""
    from onecomp_core.gather import gather_group
    sk = Skeleton(tiny_models(arch), load_plugins().registry, pick_device("cpu"))
    ids = torch.randint(3, 300, (3, 16), generator=torch.Generator().manual_seed(0))
    inputs, kwargs = capture(sk, ids)
    block = sk.block(0)
    adds = []
    real_add = Gram.add
    monkeypatch.setattr(Gram, "add", lambda self, x: (adds.append(id(self)), real_add(self, x)))
    for group in sk.adapter.linear_groups(block):
        mods = {n: block.get_submodule(n) for n in group}
        adds.clear()
        together = gather_group(block, mods, inputs, kwargs[0], {"gram"}, 2)
        distinct = len(set(adds))
        alone = {n: gather_group(block, {n: m}, inputs, kwargs[0], {"gram"}, 2)[n]["gram"] for n, m in mods.items()}
        for n in mods:
            assert torch.equal(together[n]["gram"].sum, alone[n].sum) and together[n]["gram"].n == alone[n].n, n
        sums = [together[n]["gram"].sum for n in mods]
        assert len({s.data_ptr() for s in sums}) == len(sums)            # copies: one may be changed alone
        if arch != "mixtral" and len(mods) > 1:
            assert distinct == 1, group                                  # dense: one Gram per group
    experts = [g for g in sk.adapter.linear_groups(block) if any(".experts." in n for n in g)]
    if experts:                                                          # gate/up of one expert share, experts do not
        mods = {n: block.get_submodule(n) for n in experts[0]}
        adds.clear()
        gather_group(block, mods, inputs, kwargs[0], {"gram"}, 2)
        assert 0 < len(set(adds)) <= len({n.rsplit(".", 1)[0] for n in mods}) < len(mods)


def test_bfloat16_forwards_give_statistics_close_to_float32_ones(tiny_llama):
    """The layer-wise pass's forwards under bfloat16 autocast (the default on CPUs with native
    bfloat16 matmuls): every linear's Gram within 1% (relative Frobenius) of the float32 one, and
    still summed in float32."""
    from onecomp_core.gather import gather_group
    from onecomp_core.streams import forward_precision
    sk = Skeleton(tiny_llama, load_plugins().registry, pick_device("cpu"))
    ids = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    inputs, kwargs = capture(sk, ids)
    block = sk.block(0)
    worst = 0.0
    for group in sk.adapter.linear_groups(block):
        mods = {n: block.get_submodule(n) for n in group}
        ref = gather_group(block, mods, inputs, kwargs[0], {"gram"}, 1)
        with forward_precision(torch.bfloat16, torch.device("cpu")):
            low = gather_group(block, mods, inputs, kwargs[0], {"gram"}, 1)
        for n in mods:
            H, Hb = ref[n]["gram"].H, low[n]["gram"].H
            assert Hb.dtype == torch.float32
            worst = max(worst, float((Hb - H).norm() / H.norm()))
    assert 0 < worst < 1e-2                                              # bfloat16 did run, and stayed close
