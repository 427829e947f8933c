import pytest
import torch

from onecomp_core.plugins import load_plugins
from onecomp_core.skeleton import Skeleton, pick_device
from onecomp_core.stats import input_diagonals, input_statistics
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
