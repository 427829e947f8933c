import pytest
import torch
from hypothesis import assume, given, settings, strategies as st
from safetensors.torch import load_file

import onecomp_core
from onecomp_core.sdk import LayerSpec, OnecompError
from onecomp_core.testing import requires
from onecomp_plugins_dbf.factors import Metric, bits_per_weight, compose, fit, rank_for_bpw, weighted_error
from onecomp_plugins_dbf.envelopes import objective, update_rows, update_shared
from onecomp_plugins_dbf.fmt import BinaryFactorLinear, DBFFormat
from onecomp_plugins_dbf.plugin import DBF
from onecomp_plugins_dbf.sign_descent import sweep
from onecomp_plugins_dbf.signs import pack_signs, unpack_signs
from onecomp_plugins_dbf.sinkhorn import balance


def lowrankish(out, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(out, cols, generator=g) @ torch.diag(torch.linspace(2, 0.05, cols))
            @ torch.randn(cols, cols, generator=g)) / cols ** 0.5


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), k=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_sign_packing_round_trip(rows, k, seed):
    S = torch.where(torch.rand(rows, k, generator=torch.Generator().manual_seed(seed)) > 0.5, 1.0, -1.0)
    p = pack_signs(S)
    assert p.dtype == torch.uint8 and p.shape == (rows, (k + 7) // 8)
    assert torch.equal(unpack_signs(p, k), S)


def correlated_gram(cols, seed=0):
    """The Gram of inputs with correlated channels and a few loud ones, like a real layer's."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * cols, cols // 4, generator=g) @ torch.randn(cols // 4, cols, generator=g)
    X = X + 0.3 * torch.randn(4 * cols, cols, generator=g)
    X[:, :3] *= 8
    return X.T @ X / X.shape[0]


@pytest.mark.parametrize("l,weights", [(1, "diag"), (2, "diag"), (3, "diag"), (1, "full"), (2, "full")])
def test_admm_objective_never_increases_and_improves_on_svid(l, weights):
    W = lowrankish(48, 64)
    d = torch.rand(64) + 0.1 if weights == "diag" else correlated_gram(64)
    trace = []
    Sa, A, P, Sb, B, G = fit(W, 24, l, d, iters=25, damp=0.0, trace=trace)
    assert all(b <= a for a, b in zip(trace, trace[1:]))
    assert trace[-1] < 0.95 * trace[0]
    scale = d.mean() if weights == "diag" else d.diagonal().mean()
    final = weighted_error(W, compose(Sa, A, P), compose(Sb, B, G), d / scale)
    assert final == pytest.approx(trace[-1], rel=1e-3)
    assert set(Sa.unique().tolist()) <= {-1.0, 1.0}


@settings(max_examples=25, deadline=None)
@given(cols=st.integers(1, 12), k=st.integers(1, 6), rho=st.floats(1e-3, 10), full=st.booleans(),
       seed=st.integers(0, 2**16))
def test_r_step_solves_its_sylvester_equation(cols, k, rho, full, seed):
    """Metric.solve_r returns R with H R G + rho R = rhs, for a diagonal and a full H. The
    system is built in float64 and exactly symmetric (Metric.of keeps float32 eigenvectors, and a
    float32 X^T X is symmetric only to ~1e-7; either would dominate the residual for small rho)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(cols + 2, cols, generator=g).double()
    Y = torch.randn(k + 2, k, generator=g).double()
    H, G = X.T @ X, Y.T @ Y
    H, G = (H + H.T) / (2 * H.diagonal().mean()), (G + G.T) / 2
    rhs = torch.randn(cols, k, generator=g).double()
    m = Metric(*torch.linalg.eigh(H)) if full else Metric(H.diagonal())
    R = m.solve_r(G, rhs, rho)
    Hn = m.H if full else torch.diag(m.lam)
    HRG = Hn @ R @ G
    # float64 rounding, relative to the largest term of the equation
    scale = max(float(HRG.abs().max()), rho * float(R.abs().max()), float(rhs.abs().max()))
    assert torch.allclose(HRG + rho * R, rhs, rtol=0, atol=1e-10 * scale)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(2, 12), k=st.integers(1, 8), l=st.integers(1, 3), full=st.booleans(),
       seed=st.integers(0, 2**16))
def test_envelope_updates_are_exact_minimisers(rows, k, l, full, seed):
    """Each update of envelopes.py solves its quadratic, with diagonal row weights or a full
    PSD coupling of the rows (the R side under a full Gram): the objective never rises, and no
    small perturbation of the result does better. Only well-posed systems (more rows and
    factor columns than envelope ranks, as in every real layer): with k <= l or rows <= l the
    systems are singular and the solver's 1e-7 ridge keeps them finite, not exact."""
    assume(k > l and rows > l)
    g = torch.Generator().manual_seed(seed)
    S = torch.where(torch.rand(rows, k, generator=g) > 0.5, 1.0, -1.0).double()
    E, F = torch.rand(rows, l, generator=g).double(), torch.rand(k, l, generator=g).double()
    R = torch.randn(k + 3, k, generator=g).double()
    C, N = R.T @ R, torch.randn(rows, k, generator=g).double()
    if full:
        X = torch.randn(rows + 2, rows, generator=g).double()
        w = X.T @ X / rows + 0.1 * torch.eye(rows, dtype=torch.float64)
    else:
        w = torch.rand(rows, generator=g).double() + 0.1
    f = lambda E, F: objective(compose(S, E, F), C, N, w)
    f0 = f(E, F)
    E1 = update_rows(S, F, C, N, w)
    F1 = update_shared(S, E1, C, N, w)
    # rounding tolerance relative to the largest objective value met (ill-conditioned solves
    # may land ~1e-10 away from the exact minimum)
    tol = 1e-8 * max(1.0, abs(f0), abs(f(E1, F)))
    assert f(E1, F) <= f0 + tol and f(E1, F1) <= f(E1, F) + tol
    for _ in range(3):
        dE, dF = 1e-3 * torch.randn(rows, l, generator=g).double(), 1e-3 * torch.randn(k, l, generator=g).double()
        assert f(E1 + dE, F) >= f(E1, F) - 10 * tol
        assert f(E1, F1 + dF) >= f(E1, F1) - 10 * tol


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(3, 12), k=st.integers(3, 8), l=st.integers(1, 2), seed=st.integers(0, 2**16))
def test_coupled_rows_update_by_conjugate_gradients_matches_the_direct_solve(rows, k, l, seed):
    """Large coupled systems go to matrix-free CG: from any start it lowers f and lands on the
    direct solution (small well-conditioned systems converge within its iterations)."""
    g = torch.Generator().manual_seed(seed)
    S = torch.where(torch.rand(rows, k, generator=g) > 0.5, 1.0, -1.0).double()
    F = torch.rand(k, l, generator=g).double() + 0.2
    R = torch.randn(k + 3, k, generator=g).double()
    C, N = R.T @ R + 0.1 * torch.eye(k, dtype=torch.float64), torch.randn(rows, k, generator=g).double()
    X = torch.randn(rows + 2, rows, generator=g).double()
    w = X.T @ X / rows + 0.5 * torch.eye(rows, dtype=torch.float64)
    E0 = torch.rand(rows, l, generator=g).double()
    direct = update_rows(S, F, C, N, w)
    cg = update_rows(S, F, C, N, w, E0, direct_max=0)
    f = lambda E: objective(compose(S, E, F), C, N, w)
    assert f(cg) <= f(E0) + 1e-9 * (1 + abs(f(E0)))
    # within CG's 30 iterations: 24 unknowns of an ill-conditioned w (rows=12, l=2, seed=1148)
    # stop 1.8e-5 short of the direct minimum
    assert f(cg) == pytest.approx(f(direct), rel=1e-4, abs=1e-8)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 10), k=st.integers(1, 12), full=st.booleans(), seed=st.integers(0, 2**16))
def test_sign_descent_never_increases_and_ends_at_a_single_flip_minimum(rows, k, full, seed):
    """sign_descent.sweep, rows independent (L side) or coupled by a full Gram (R side): the
    objective never rises, and (independent rows) once the sweeps stop flipping no single
    sign flip lowers it (checked by brute force)."""
    g = torch.Generator().manual_seed(seed)
    S = torch.where(torch.rand(rows, k, generator=g) > 0.5, 1.0, -1.0).double()
    V = torch.rand(rows, k, generator=g).double() + 0.05
    Y = torch.randn(k + 2, k, generator=g).double()
    C, N = Y.T @ Y, torch.randn(rows, k, generator=g).double()
    if full:
        X = torch.randn(rows + 1, rows, generator=g).double() + 1.0     # strongly correlated rows
        w = X.T @ X / rows + 0.05 * torch.eye(rows, dtype=torch.float64)
    else:
        w = torch.ones(rows, dtype=torch.float64)
    f = lambda S: objective(S * V, C, N, w)
    S1, flips = sweep(S, V, C, N, w if full else None, sweeps=50)
    assert f(S1) <= f(S) + 1e-9 * (1 + abs(f(S)))
    assert set(S1.unique().tolist()) <= {-1.0, 1.0} and flips >= int((S1 != S).sum())
    if full:
        return
    for i in range(rows):
        for j in range(k):
            T = S1.clone()
            T[i, j] = -T[i, j]
            assert f(T) >= f(S1) - 1e-9 * (1 + abs(f(S1)))


def test_activation_aware_fit_lowers_the_weighted_error():
    W = lowrankish(32, 48, 1)
    d = torch.ones(48)
    d[:6] = 50.0                                              # a few loud input channels
    f_plain = fit(W, 16, 1, None, iters=20)
    f_aware = fit(W, 16, 1, d, iters=20)
    err = lambda f: weighted_error(W, compose(*f[:3]), compose(*f[3:]), d)
    assert err(f_aware) < err(f_plain)


def test_full_gram_fit_beats_diagonal_on_correlated_inputs():
    """Weighting by the full Gram (GPTQ's objective) lowers that objective below the fit that
    only sees its diagonal: the inputs are correlated, as a real layer's are."""
    W, H = lowrankish(40, 64, 2), correlated_gram(64, 1)
    full = fit(W, 20, 1, H, iters=20)
    diag = fit(W, 20, 1, H.diagonal(), iters=20)
    err = lambda f: weighted_error(W, compose(*f[:3]), compose(*f[3:]), H)
    assert err(full) < 0.9 * err(diag)


def test_rank_and_bits_accounting():
    for bpw in (1.0, 1.5, 2.0):
        for l in (1, 2):
            k = rank_for_bpw(576, 1536, bpw, l)
            assert bits_per_weight(576, 1536, k, l) <= bpw < bits_per_weight(576, 1536, k + 1, l)


@pytest.mark.parametrize("k_bpw", [1.0, 1.37])
def test_bits_on_disk_match_the_accounting(k_bpw):
    fmt = DBFFormat()
    spec = LayerSpec(name="m", format="dbf", projector="dbf", options={"bpw": k_bpw})
    W = lowrankish(40, 56)
    t = DBF().project(W, torch.eye(56), spec, fmt)
    tensors = fmt.to_tensors("m", t, torch.float32)
    disk = sum(v.numel() * v.element_size() * 8 for n, v in tensors.items() if not n.endswith("bf_shape"))
    k, out, cols = t.k, 40, 56
    pad = (-k) % 8
    assert disk == bits_per_weight(out, cols, k, 1) * out * cols + pad * (out + cols)
    assert fmt.bits_per_weight(spec, (out, cols)) <= k_bpw


def test_save_load_round_trip_and_inference_module():
    fmt = DBFFormat()
    spec = LayerSpec(name="m", format="dbf", projector="dbf", options={"bpw": 2.0})
    W = lowrankish(24, 40)
    t = DBF().project(W, torch.eye(40), spec, fmt)
    back = fmt.from_tensors("m", fmt.to_tensors("m", t, torch.float32), {})
    assert torch.equal(back.dequantize(), t.dequantize())
    lin = BinaryFactorLinear(back, bias=torch.randn(24))
    x = torch.randn(2, 5, 40)
    with torch.no_grad():
        y = lin(x)
    assert torch.allclose(y, x @ t.dequantize().T + lin.bias, atol=1e-4)
    assert lin._cache is not None                    # 10 rows (decoding): L and R kept for the next call
    long = torch.randn(1, lin.cache_rows + 1, 40)
    with torch.no_grad():                            # a long input drops them
        y_long = lin(long)
    assert lin._cache is None and torch.allclose(y_long, long @ t.dequantize().T + lin.bias, atol=1e-4)
    lin.train_signs()
    lin(x).sum().backward()
    assert lin.A.grad is not None and lin.latent_a.grad is not None


def test_sinkhorn_balances_and_reconstructs():
    W = lowrankish(30, 40) * torch.linspace(0.1, 5, 40)[None, :]
    Wb, r, c = balance(W, 2, 20)
    assert torch.allclose(r[:, None] * Wb * c[None, :], W, atol=1e-5)
    rows, cols = Wb.pow(2).mean(1).sqrt(), Wb.pow(2).mean(0).sqrt()
    assert float(rows.std() / rows.mean()) < 0.05 and float(cols.std() / cols.mean()) < 0.05


def test_dbf_needs_a_bpw_target(tiny_llama, tmp_path):
    with pytest.raises(OnecompError, match="needs a bits-per-weight target"):
        onecomp_core.quantize(tiny_llama, tmp_path / "q", format="dbf", projector="dbf", num_samples=2, seq_len=32)


@pytest.mark.parametrize("fmt,corr", [
    ("dbf", []),
    pytest.param("mdbf", [], marks=requires("format", "mdbf")),
    pytest.param("dbf", ["qep"], marks=requires("refiner", "qep")),
    pytest.param("mdbf", ["lpcd"], marks=[requires("format", "mdbf"), requires("refiner", "lpcd")])])
def test_end_to_end(tiny_llama, tmp_path, fmt, corr):
    bpw = 1.5 if fmt == "dbf" else 2.0        # tiny 32 x 64 layers: l = 2 envelopes need the room
    rep = onecomp_core.quantize(tiny_llama, tmp_path / "q", format=fmt, projector=fmt, target_bpw=bpw,
                                refiners=corr, num_samples=2, seq_len=32)
    assert rep["summary"]["bpw"] <= bpw
    model = onecomp_core.load_quantized(tmp_path / "q")
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(3, 300, (1, 12))).logits).all()
    # the report counts what each loaded module holds (mdbf may store l = 1 in some modules)
    # and records the (k, l) it stores
    mods = {n: m for n, m in model.named_modules() if isinstance(m, BinaryFactorLinear)}
    kl = {n: (m.sign_a.shape[1], m.A.shape[1]) for n, m in mods.items()}
    assert mods and {n: bits_per_weight(m.out_features, m.in_features, *kl[n]) for n, m in mods.items()} == {
        n: rep["layers"][n]["bpw"] for n in mods}
    assert kl == {n: (rep["layers"][n]["k"], rep["layers"][n]["l"]) for n in mods}


def test_format_and_projector_share_their_option_table():
    base = {"format": "dbf", "projector": "dbf", "target_bpw": 1.5}
    d = onecomp_core.describe_config("m", {**base, "options": {"dbf": {"iters": 3, "sinkhorn": "l2"}}})
    assert d["resolved_options"]["projector:dbf"]["iters"] == 3
    assert d["resolved_options"]["projector:dbf"]["sinkhorn"] == "l2"
    with pytest.raises(OnecompError, match=r"projector 'dbf' has no option\(s\) 'itters'; options: .*iters"):
        onecomp_core.describe_config("m", {**base, "options": {"dbf": {"itters": 3}}})


def test_rho_schedule_grows_geometrically_between_its_ends():
    from onecomp_plugins_dbf.factors import rho_schedule
    rhos = rho_schedule(0.02, 4.0, 30)
    assert len(rhos) == 30 and rhos[0] == pytest.approx(0.02) and rhos[-1] == pytest.approx(4.0)
    ratios = [b / a for a, b in zip(rhos, rhos[1:])]
    assert max(ratios) == pytest.approx(min(ratios)) and ratios[0] > 1
    assert rho_schedule(0.5, 4.0, 1) == [0.5] and rho_schedule(0.5, 4.0, 0) == []


def fitted(seed, bpw=1.5, out=24, cols=40):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, cols, generator=g)
    spec = LayerSpec(name="m", format="dbf", options={"bpw": bpw})
    fmt = DBFFormat()
    return W, spec, fmt, DBF(DBF.Options(iters=3, polish=1)).project(W, None, spec, fmt)


def test_trainable_view_starts_at_the_stored_factors():
    W, spec, fmt, t = fitted(0)
    view = fmt.trainable(t, spec)
    assert torch.equal(view.weight(), t.dequantize())
    a, b = fmt.to_tensors("m", t, torch.float16), fmt.to_tensors("m", view.write_back(), torch.float16)
    assert all(torch.equal(a[k], b[k]) for k in a)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 1000), noise=st.floats(0.0, 5.0))
def test_trainable_view_writes_back_packed_signs_and_fp16_envelopes_of_the_same_size(seed, noise):
    W, spec, fmt, t = fitted(seed)
    view = fmt.trainable(t, spec)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in view.parameters():
            p.add_(noise * torch.randn(p.shape, generator=g))
    back = view.write_back()
    assert set(back.Sa.unique().tolist()) <= {-1.0, 1.0} and set(back.Sb.unique().tolist()) <= {-1.0, 1.0}
    for x in (back.A, back.P, back.B, back.G):
        assert torch.equal(x, x.half().float())
    a, b = fmt.to_tensors("m", t, torch.float16), fmt.to_tensors("m", back, torch.float16)
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    assert fmt.stored_bits_per_weight(spec, t.shape, back) == fmt.stored_bits_per_weight(spec, t.shape, t)
    assert torch.equal(view.weight(), back.dequantize())          # trained function == stored function


def test_trainable_view_gradients_reach_envelopes_and_signs():
    W, spec, fmt, t = fitted(1)
    view = fmt.trainable(t, spec)
    ((view.weight() - W) ** 2).sum().backward()
    assert set(view.param_groups()) == {"scales", "codes"}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for ps in view.param_groups().values() for p in ps)
