import json
import random

import pytest
import torch
from hypothesis import given, settings, strategies as st

import onecomp_core
from onecomp_core.sdk import OnecompError, load_plugins
from onecomp_core.testing import installed, requires
from onecomp_plugin_autobit.budget import fit_memory_budget_bits, inference_overhead_bytes, parse_size
from onecomp_plugin_autobit.errors import candidate_error, conditional_variances
from onecomp_plugin_autobit.heatmap import allocation_png
from onecomp_plugin_autobit.ilp import _cpsat, brute_force, smallest_budget, solve


def random_instance(seed, units, cands, slack):
    """Errors, whole-bit costs and a budget a fraction ``slack`` of the way from the smallest
    feasible to the largest useful one."""
    rng = random.Random(seed)
    E = [[rng.uniform(0, 10) for _ in range(cands)] for _ in range(units)]
    M = [[float(rng.randint(1, 20)) for _ in range(cands)] for _ in range(units)]
    lo, hi = smallest_budget(M), sum(max(m) for m in M)
    return E, M, lo + slack * (hi - lo)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), units=st.integers(1, 5), cands=st.integers(1, 4), slack=st.floats(0, 1))
def test_ilp_matches_brute_force(seed, units, cands, slack):
    E, M, budget = random_instance(seed, units, cands, slack)
    choice, solver, _ = solve(E, M, budget)
    _, best = brute_force(E, M, budget)
    assert sum(M[i][c] for i, c in enumerate(choice)) <= budget + 1e-9
    assert sum(E[i][c] for i, c in enumerate(choice)) == pytest.approx(best, rel=1e-6, abs=1e-9)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), units=st.integers(1, 5), cands=st.integers(1, 4), slack=st.floats(0, 1))
def test_cpsat_fallback_matches_brute_force(seed, units, cands, slack):
    # the solver used where SCIP is missing: whole-bit costs, a fractional budget
    E, M, budget = random_instance(seed, units, cands, slack)
    choice, name = _cpsat(E, M, budget, max(max(e) for e in E), 10.0)
    _, best = brute_force(E, M, budget)
    assert name == "CP-SAT"
    assert sum(M[i][c] for i, c in enumerate(choice)) <= budget + 1e-9
    assert sum(E[i][c] for i, c in enumerate(choice)) == pytest.approx(best, rel=1e-6, abs=1e-6)


def test_cpsat_fallback_never_exceeds_a_budget_with_fractional_costs():
    # truncating 2.6 to 2 would let both 2.6-bit candidates into a 5-bit budget (5.2 bits)
    choice, _ = _cpsat([[0.0, 9.0], [0.0, 9.0]], [[2.6, 1.0], [2.6, 1.0]], 5.0, 9.0, 10.0)
    assert sorted(choice) == [0, 1]


def test_infeasible_budget_states_the_smallest():
    with pytest.raises(OnecompError, match="smallest feasible 7 bits"):
        solve([[1, 2], [1, 2]], [[3, 4], [4, 5]], 6)


def test_fit_memory_arithmetic():
    from transformers import LlamaConfig
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152)
    over = inference_overhead_bytes(cfg, context=4096, batch=2)
    assert over["kv_cache"] == 2 * 30 * 3 * 64 * 4096 * 2 * 2
    assert over["activations"] == 2 * 4096 * (4 * 576 + 2 * 1536) * 2 + 2 * 49152 * 4
    bits, over2 = fit_memory_budget_bits(parse_size("1GiB"), cfg, other_params=1000, context=4096, batch=2)
    assert bits == (2**30 - over["kv_cache"] - over["activations"] - 2000) * 8
    with pytest.raises(OnecompError, match="do not even hold"):
        fit_memory_budget_bits(parse_size("10MB"), cfg, 0, 4096, 2)
    assert parse_size("6GiB") == 6 * 2**30 and parse_size("1.5 GB") == 1.5e9 and parse_size(512) == 512
    with pytest.raises(OnecompError, match="cannot read the size"):
        parse_size("six gigs")


def test_activation_aware_error_weights_columns():
    W = torch.randn(4, 64)
    A = torch.zeros(64)
    A[:8] = 1
    full = candidate_error(W, 3, 32, False)
    part = candidate_error(W, 3, 32, False, A=A)
    assert 0 < part < full
    assert candidate_error(W, 8, 32, False) < candidate_error(W, 2, 32, False)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 12), act_order=st.booleans())
def test_conditional_variances_are_gptq_schur_complements(seed, n, act_order):
    """c_j = H_jj - H_jL H_LL^-1 H_Lj over the inputs L after j in GPTQ's order (Schur
    complement of the damped H), never above H_jj; the last input keeps its whole variance."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3 * n, generator=g, dtype=torch.float64) * torch.rand(n, 1, generator=g, dtype=torch.float64)
    H = X @ X.T / X.shape[1]
    c = conditional_variances(H, damp=0.01, act_order=act_order).double()
    Hd = H + 0.01 * H.diagonal().mean() * torch.eye(n, dtype=H.dtype)
    order = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(n)
    for pos, j in enumerate(order.tolist()):
        later = order[pos + 1:]
        want = Hd[j, j] - (Hd[j, later] @ torch.linalg.solve(Hd[later][:, later], Hd[later, j]) if len(later) else 0)
        assert torch.isclose(c[j], want, rtol=1e-4, atol=1e-9)
        assert c[j] <= Hd[j, j] * (1 + 1e-5)
    assert torch.isclose(c[order[-1]], Hd[order[-1], order[-1]], rtol=1e-4)


def test_conditional_variance_of_a_dead_input_is_zero():
    H = torch.diag(torch.tensor([2.0, 0.0, 1.0]))
    c = conditional_variances(H)
    assert c[1] == 0 and c[0] > 0 and c[2] > 0
    # independent inputs: nothing to absorb, c = the damped diagonal (the dead input counts as
    # 1 in the mean, as in GPTQ)
    assert torch.allclose(c[[0, 2]], torch.tensor([2.0, 1.0]) + 0.01 * 4 / 3, rtol=1e-5)


def test_heatmap_is_a_png():
    data = allocation_png([[2.1, 4.2, None], [8.2, 3.1, 3.1]])
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and b"IHDR" in data and data.endswith(b"IEND\xaeB`\x82")


def test_found_by_name():
    ps = load_plugins()
    assert ps.registry.source("planner", "autobit") == "autobit"


def quantize(model, out, **kw):
    base = dict(planner="autobit", projector="rtn", num_samples=2, seq_len=32)
    base.update(kw)
    return onecomp_core.quantize(model, out, **base)


@pytest.mark.parametrize("target", [2.5, 3.0, 4.2])
def test_checkpoint_bpw_never_exceeds_budget(tiny_llama, tmp_path, target):
    rep = quantize(tiny_llama, tmp_path / "q", target_bpw=target)
    assert rep["summary"]["bpw"] <= target + 1e-9
    meta = json.loads((tmp_path / "q" / "onecomp.json").read_text())
    bits = {(m["bits"], m["group_size"]) for m in meta["modules"].values()}
    assert len(bits) >= 1
    assert (tmp_path / "q" / "autobit_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert rep["plan_info"]["planned_bpw"] <= target + 1e-9


def test_tied_modules_share_a_choice_and_mixed_precision_loads(tiny_llama, tmp_path):
    rep = quantize(tiny_llama, tmp_path / "q", target_bpw=3.3, symmetric=True)
    plan = rep["plan"]
    for blk in (0, 1):
        qkv = {(plan[f"model.layers.{blk}.self_attn.{m}"]["bits"], plan[f"model.layers.{blk}.self_attn.{m}"]["group_size"])
               for m in ("q_proj", "k_proj", "v_proj")}
        gu = {(plan[f"model.layers.{blk}.mlp.{m}"]["bits"], plan[f"model.layers.{blk}.mlp.{m}"]["group_size"])
              for m in ("gate_proj", "up_proj")}
        assert len(qkv) == 1 and len(gu) == 1
    # mixed precision round-trips through the compressed-tensors export
    from transformers import AutoModelForCausalLM
    ours = onecomp_core.load_quantized(tmp_path / "q")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    ids = torch.randint(3, 384, (1, 20))
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=1e-5)


def test_overrides_and_budget_errors(tiny_llama, tmp_path):
    rep = quantize(tiny_llama, tmp_path / "q", target_bpw=4.0,
                   options={"autobit": {"overrides": {"*.down_proj": {"bits": 8, "group_size": 32}}}})
    downs = [s for n, s in rep["plan"].items() if n.endswith("down_proj")]
    assert downs and all(s["bits"] == 8 and s["group_size"] == 32 for s in downs)
    with pytest.raises(OnecompError, match="smallest feasible"):
        quantize(tiny_llama, tmp_path / "r", target_bpw=1.0)
    with pytest.raises(OnecompError, match="needs exactly one budget"):
        quantize(tiny_llama, tmp_path / "s")
    assert not (tmp_path / "r").exists() and not (tmp_path / "s").exists()


def test_budget_bytes_and_fit_memory(tiny_llama, tmp_path):
    rep = quantize(tiny_llama, tmp_path / "q", budget_bytes=20000)
    params = rep["summary"]["quantized_params"]
    assert rep["summary"]["bpw"] * params <= 20000 * 8 + 1e-6
    rep = quantize(tiny_llama, tmp_path / "f", fit_memory="600KB", context=64)
    assert rep["plan_info"]["budget_from"] == "fit_memory" and rep["plan_info"]["overhead_bytes"]["kv_cache"] > 0


def test_output_curvature_is_the_mean_squared_output_gradient(tiny_llama):
    from transformers import AutoModelForCausalLM
    from onecomp_plugin_autobit.errors import output_curvature
    ids = torch.randint(3, 384, (3, 16))
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    B = output_curvature(tiny_llama, ids, names, max_samples=2)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    want = {n: 0 for n in names}
    for row in ids[:2]:
        outs = {}

        def keep(m, i, o, n):
            o.retain_grad()
            outs[n] = o
        hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: keep(m, i, o, n)) for n in names]
        model(input_ids=row[None], labels=row[None]).loss.backward()
        for h in hooks:
            h.remove()
        for n in names:
            g = outs[n].grad.reshape(-1, outs[n].shape[-1])
            want[n] = want[n] + (g * g).sum(0)
    for n in names:
        assert B[n].shape == (model.get_submodule(n).out_features,)
        assert torch.allclose(B[n], want[n] / 32, rtol=1e-4, atol=1e-12)


def test_error_model_is_reported(tiny_llama, tmp_path):
    rep = quantize(tiny_llama, tmp_path / "a", target_bpw=3.0)
    assert rep["plan_info"]["error_model"] == "activation+curvature"
    rep = quantize(tiny_llama, tmp_path / "f", target_bpw=3.0, options={"autobit": {"error": "frobenius"}})
    assert rep["plan_info"]["error_model"] == "frobenius"
    rep = quantize(tiny_llama, tmp_path / "n", target_bpw=3.0, options={"autobit": {"curvature": False}})
    assert rep["plan_info"]["error_model"] == "activation"


@requires("projector", "gptq")
def test_error_model_follows_a_gptq_projector(tiny_llama, tmp_path):
    rep = quantize(tiny_llama, tmp_path / "c", target_bpw=3.0, projector="gptq")      # auto: GPTQ-aware
    assert rep["plan_info"]["error_model"] == "conditional+curvature"
    assert rep["summary"]["bpw"] <= 3.0 + 1e-9


@requires("format", "dbf")
def test_binary_factor_candidates_mix_with_the_grid(tiny_llama, tmp_path):
    """With autobit.binary the planner may give modules a DBF factorisation; the checkpoint
    mixes formats, stays inside the budget and loads back."""
    opts = {"autobit": {"bits": [2, 4], "groups": [32], "binary": [1.0, 1.5], "binary_iters": 2}}
    rep = quantize(tiny_llama, tmp_path / "q", target_bpw=2.2, options=opts)
    plan = rep["plan"]
    formats = {s["format"] for s in plan.values()}
    assert "dbf" in formats                                # 2-bit g32 alone costs 3.0 bpw
    assert rep["summary"]["bpw"] <= 2.2 + 1e-9
    for s in plan.values():
        assert (s["format"] == "dbf") == ("bpw" in s["options"])
        if s["format"] == "dbf":
            assert s["projector"] == "dbf" and s["options"]["bpw"] in (1.0, 1.5)
    saved = json.loads((tmp_path / "q" / "autobit_plan.json").read_text())["modules"]
    assert any(v == {"dbf": 1.0} or v == {"dbf": 1.5} for v in saved.values())
    model = onecomp_core.load_quantized(tmp_path / "q")
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(3, 384, (1, 12))).logits).all()
    with pytest.raises(OnecompError, match="autobit.binary_format: unknown format .nope."):
        quantize(tiny_llama, tmp_path / "r", target_bpw=2.2, options={"autobit": {"binary": [1.0], "binary_format": "nope"}})
    with pytest.raises(OnecompError, match="uniform format"):
        quantize(tiny_llama, tmp_path / "s", target_bpw=1.5, format="dbf", projector="dbf")


def test_cached_errors_skip_the_statistics_pass(tiny_llama, tmp_path, monkeypatch):
    import onecomp_plugin_autobit.plugin as ab
    first = quantize(tiny_llama, tmp_path / "a", target_bpw=3.0)

    def boom(*a, **k):
        raise AssertionError("curvature recomputed although every error is cached")
    monkeypatch.setattr(ab, "output_curvature", boom)
    again = quantize(tiny_llama, tmp_path / "b", target_bpw=3.0)
    assert again["plan"] == first["plan"]



def test_true_fisher_curvature_plans_inside_the_budget(tiny_llama, tmp_path):
    """Both Fishers give a curvature of the right shape and a plan inside the budget, and they differ."""
    from onecomp_plugin_autobit.errors import output_curvature
    ids = torch.randint(3, 384, (2, 16))
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    true = output_curvature(tiny_llama, ids, names, max_samples=2, fisher="true")
    again = output_curvature(tiny_llama, ids, names, max_samples=2, fisher="true")
    emp = output_curvature(tiny_llama, ids, names, max_samples=2, fisher="empirical")
    for n in names:
        assert true[n].shape == emp[n].shape and (true[n] > 0).any()
        assert torch.equal(true[n], again[n])                    # seeded draws
    assert not torch.allclose(true[names[0]], emp[names[0]], rtol=1e-2)
    for fisher in ("true", "empirical"):
        rep = quantize(tiny_llama, tmp_path / fisher, target_bpw=3.0, options={"autobit": {"fisher": fisher}})
        assert rep["summary"]["bpw"] <= 3.0 + 1e-9


def test_parallel_candidate_errors_equal_serial(tiny_llama, tmp_path):
    """Candidate errors computed by several threads give the same errors and plan as one thread
    (grid and, where onecomp-plugins-dbf is installed, binary-factor candidates)."""
    binary = [1.5] if installed("format", "dbf") else []
    opts = {"bits": [2, 4], "groups": [32, -1], "binary": binary, "binary_iters": 2, "cache": False}
    one = quantize(tiny_llama, tmp_path / "a", target_bpw=2.5, options={"autobit": {**opts, "workers": 1}})
    many = quantize(tiny_llama, tmp_path / "b", target_bpw=2.5, options={"autobit": {**opts, "workers": 3}})
    assert many["plan"] == one["plan"]
    assert many["plan_info"]["predicted_error"] == pytest.approx(one["plan_info"]["predicted_error"], rel=1e-6)


def test_a_budget_above_every_candidate_says_the_plan_takes_the_largest(tiny_llama, tmp_path, capsys):
    rep = quantize(tiny_llama, tmp_path / "q", target_bpw=100)
    assert "reaches the largest candidates" in capsys.readouterr().err
    assert rep["summary"]["bpw"] < 100
    assert {m["bits"] for m in rep["plan"].values()} == {max(m["bits"] for m in rep["plan"].values())}
