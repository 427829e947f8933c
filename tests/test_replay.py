"""ProjectionReplay on a toy module: it returns the output projection of the recorded input
only where that equals the module's real output, and otherwise the real forward every time."""
import torch

from onecomp_core.replay import Replays


class Toy(torch.nn.Module):
    def __init__(self, scale_after: float = 1.0, weights: bool = False):
        super().__init__()
        self.inner = torch.nn.Linear(4, 4)
        self.proj = torch.nn.Linear(4, 4)
        self.scale_after, self.weights, self.calls = scale_after, weights, 0

    def forward(self, x):
        self.calls += 1
        h = self.inner(x).relu()
        return self.proj(h) * self.scale_after, (h.sum(-1) if self.weights else None)


def _rounds(toy, xs, n_rounds):
    reps = Replays()
    reps.add_projection(toy, toy.proj)
    outs = []
    with torch.no_grad():
        for _ in range(n_rounds):
            with reps.round(len(xs)):
                outs.append([toy(x) for x in xs])
    reps.remove()
    return outs


def test_the_recorded_projection_stands_in_for_the_module_where_it_agrees():
    torch.manual_seed(0)
    xs = [torch.randn(3, 4) for _ in range(3)]
    toy = Toy()
    ref = [toy(x) for x in xs]
    toy.calls = 0
    outs = _rounds(toy, xs, 3)
    for got in outs:
        assert all(torch.equal(g[0], r[0]) and g[1] is None for g, r in zip(got, ref))
    assert toy.calls == 3 + 1             # the recording round, then one real call to check against
    assert "forward" not in toy.__dict__  # removed


def test_the_real_forward_runs_where_the_projection_is_not_the_output_or_more_tensors_come_back():
    torch.manual_seed(0)
    xs = [torch.randn(3, 4) for _ in range(2)]
    for toy in (Toy(scale_after=2.0), Toy(weights=True)):
        ref = [toy(x) for x in xs]
        toy.calls = 0
        outs = _rounds(toy, xs, 3)
        for got in outs:
            assert all(torch.equal(g[0], r[0]) for g, r in zip(got, ref))
        assert toy.calls == 3 * len(xs)
