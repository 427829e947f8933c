import pytest
import torch

import onecomp_core
from onecomp_core.sdk import Cross, load_plugins
from onecomp_core.testing import ARCHS, requires
from onecomp_plugin_qep import QEP, qep_target, writer_target


def test_registered_by_name():
    reg = load_plugins().registry
    assert reg.get("refiner", "qep") is QEP and reg.source("refiner", "qep") == "qep"
    assert QEP.scopes() == ("layer",) and QEP.statistics == {"gram", "cross"}


def test_qep_target_is_the_least_squares_solution_at_alpha_1():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(16, 400, generator=g)
    Xq = X + 0.1 * torch.randn(16, 400, generator=g)             # the quantized stream's input
    W = torch.randn(8, 16, generator=g)
    acc = Cross.of(16)
    for s in range(4):                                          # accumulated in pieces
        acc.add(X[:, s * 100:(s + 1) * 100].T, Xq[:, s * 100:(s + 1) * 100].T)
    H = Xq @ Xq.T / 400
    target = qep_target(W, H, acc.C, alpha=1.0, damp=0.0)
    best = torch.linalg.lstsq(Xq.T, (W @ X).T).solution.T        # argmin ||W X - W' Xq||
    assert torch.allclose(target, best, atol=1e-4)
    half = qep_target(W, H, acc.C, alpha=0.5, damp=0.0)
    assert torch.allclose(half, W + 0.5 * (best - W), atol=1e-4)


def test_writer_target_absorbs_the_residual_error():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(16, 300, generator=g)
    Xq = X + 0.1 * torch.randn(16, 300, generator=g)
    D = 0.05 * torch.randn(8, 300, generator=g)                  # h - h^ at the writer's add
    W = torch.randn(8, 16, generator=g)
    C = (X - Xq) @ Xq.T / 300
    R = D @ Xq.T / 300
    H = Xq @ Xq.T / 300
    target = writer_target(W, H, C, R, alpha=1.0, damp=0.0)
    best = torch.linalg.lstsq(Xq.T, (W @ X + D).T).solution.T      # argmin ||W X + D - W' Xq||
    assert torch.allclose(target, best, atol=1e-4)


def test_not_positive_definite_leaves_the_target_alone():
    W = torch.randn(3, 4)
    assert torch.equal(qep_target(W, -torch.eye(4), torch.zeros(4, 4), 0.5, 0.0), W)


@pytest.mark.parametrize("arch", ARCHS)
def test_qep_runs_on_every_architecture(arch, tiny_models, tmp_path):
    rep = onecomp_core.quantize(tiny_models(arch), tmp_path / arch, bits=3, group_size=32, projector="rtn",
                                refiners=["qep"], num_samples=2, seq_len=32)
    errs = [li["rel_error"] for li in rep["layers"].values()]
    assert errs and all(0 <= e < 2 for e in errs), arch


@pytest.mark.parametrize("projector", ["rtn", pytest.param("gptq", marks=requires("projector", "gptq")),
                                       pytest.param("jointq", marks=requires("projector", "jointq"))])
def test_qep_in_front_of_any_projector_changes_the_result(tiny_llama, tmp_path, projector):
    from safetensors.torch import load_file
    a = onecomp_core.quantize(tiny_llama, tmp_path / "a", bits=3, group_size=32, projector=projector,
                              num_samples=2, seq_len=32)
    b = onecomp_core.quantize(tiny_llama, tmp_path / "b", bits=3, group_size=32, projector=projector,
                              refiners=["qep"], options={"qep": {"alpha": 1.0}}, num_samples=2, seq_len=32)
    ta = load_file(tmp_path / "a" / "model-block-00001.safetensors")
    tb = load_file(tmp_path / "b" / "model-block-00001.safetensors")
    assert any(not torch.equal(ta[k], tb[k]) for k in ta if k.endswith("weight_packed"))
    assert b["summary"]["bpw"] == a["summary"]["bpw"]                # same format, same bits


def test_excluded_modules_keep_their_plain_target(tiny_llama, tmp_path):
    from safetensors.torch import load_file
    a = onecomp_core.quantize(tiny_llama, tmp_path / "a", bits=3, group_size=32, projector="rtn", num_samples=2,
                              seq_len=32)
    b = onecomp_core.quantize(tiny_llama, tmp_path / "b", bits=3, group_size=32, projector="rtn", refiners=["qep"],
                              options={"qep": {"exclude": ["*"]}}, num_samples=2, seq_len=32)
    ta, tb = (load_file(tmp_path / d / "model-block-00001.safetensors") for d in ("a", "b"))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
