import pytest
import torch

import onecomp_core
from onecomp_plugins_gptq.qep import CrossAccumulator, qep_target


def test_qep_target_is_the_least_squares_solution_at_alpha_1():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(16, 400, generator=g)
    Xq = X + 0.1 * torch.randn(16, 400, generator=g)             # the quantized stream's input
    W = torch.randn(8, 16, generator=g)
    acc = CrossAccumulator(16, "cpu")
    for s in range(4):                                          # accumulated online, in pieces
        acc.add(X[:, s * 100:(s + 1) * 100].T, Xq[:, s * 100:(s + 1) * 100].T)
    H = Xq @ Xq.T / 400
    target = qep_target(W, H, acc.C, alpha=1.0, damp=0.0)
    best = torch.linalg.lstsq(Xq.T, (W @ X).T).solution.T        # argmin ||W X - W' Xq||
    assert torch.allclose(target, best, atol=1e-4)
    half = qep_target(W, H, acc.C, alpha=0.5, damp=0.0)
    assert torch.allclose(half, W + 0.5 * (best - W), atol=1e-4)


def test_qep_needs_fp_inputs_and_runs_everywhere(tiny_models, tmp_path):
    from tiny import ARCHS
    for arch in ARCHS:
        rep = onecomp_core.quantize(tiny_models(arch), tmp_path / arch, bits=3, group_size=32, projector="gptq",
                                    corrections=["qep"], num_samples=2, seq_len=32)
        errs = [li["rel_error"] for li in rep["layers"].values()]
        assert errs and all(0 <= e < 2 for e in errs), arch


@pytest.mark.parametrize("projector", ["rtn", "gptq", "jointq"])
def test_qep_in_front_of_any_projector_changes_the_result(tiny_llama, tmp_path, projector):
    from safetensors.torch import load_file
    a = onecomp_core.quantize(tiny_llama, tmp_path / "a", bits=3, group_size=32, projector=projector,
                              num_samples=2, seq_len=32)
    b = onecomp_core.quantize(tiny_llama, tmp_path / "b", bits=3, group_size=32, projector=projector,
                              corrections=["qep"], options={"qep": {"alpha": 1.0}}, num_samples=2, seq_len=32)
    ta = load_file(tmp_path / "a" / "model-block-00001.safetensors")
    tb = load_file(tmp_path / "b" / "model-block-00001.safetensors")
    assert any(not torch.equal(ta[k], tb[k]) for k in ta if k.endswith("weight_packed"))
