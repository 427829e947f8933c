"""The one place calibration statistics are computed: forward hooks on a block's linears, fed
batches of calibration samples, accumulating the mergeable sums of :mod:`onecomp_core.stats`
that the run's components declared they need.

Blocks run on ``batch`` samples at a time (one forward per batch, not per sample); the sums
are still added sample by sample, in sample order, so the result does not depend on the batch
size (the forward of a dense block is the same per sample whatever the batch; a routed MoE block
may differ in the last bits).
"""
from __future__ import annotations

import torch

from .stats import Cross, Diag, Gram, Residual
from .streams import batches, run_block

# what a component may declare in ``statistics`` (per linear, gathered on the quantized stream)
STATISTICS = {
    "gram": "H = X^ X^^T / N, the input Gram of the linear on the quantized stream",
    "cross": "C = (X - X^) X^^T / N, FP-stream input against quantized-stream input",
    "residual": "R = (h - h^) X^^T / N at a residual writer's add (o_proj, down_proj)",
}


class StopForward(Exception):
    """Raised from a hook once every linear of interest has seen its input."""


class InputCollector:
    """Forward pre-hooks on some modules: feed each input to ``sink(name, x)``; with
    ``stop_early`` stop the forward as soon as all of them have run."""

    def __init__(self, modules: dict[str, torch.nn.Module], sink, stop_early: bool = True):
        self.modules, self.sink, self.stop_early = modules, sink, stop_early
        self.seen: set[str] = set()
        self.handles = []

    def __enter__(self):
        for name, mod in self.modules.items():
            self.handles.append(mod.register_forward_pre_hook(self._hook(name)))
        return self

    def _hook(self, name):
        def hook(mod, args):
            self.sink(name, args[0].detach())
            self.seen.add(name)
            if self.stop_early and len(self.seen) == len(self.modules):
                raise StopForward
        return hook

    def run(self, fn) -> None:
        self.seen = set()
        try:
            fn()
        except StopForward:
            pass

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []


def samples(x: torch.Tensor):
    """The per-sample slices of a block input (B, L, d); a routed expert's (tokens, d) as one."""
    return [x[s] for s in range(x.shape[0])] if x.dim() == 3 else [x]


def inputs_of(block, modules: dict, hidden: torch.Tensor, kwargs: dict) -> dict:
    """{name: input} of ``modules`` for one forward of ``block`` on ``hidden``, stopping early."""
    got: dict = {}
    with InputCollector(modules, got.__setitem__) as col:
        with torch.no_grad():
            col.run(lambda: block(hidden, **kwargs))
    return got


def gather_group(block, mods: dict, q: torch.Tensor, kwargs: dict, needs: set, batch: int,
                 fp_block=None, fp: torch.Tensor | None = None, taps: dict | None = None,
                 dtype: torch.dtype = torch.float32) -> dict:
    """Statistics of the linears ``mods`` (relative name -> module) of ``block`` on the quantized
    stream ``q`` (N, L, d): -> {name: {kind: Statistic}} for the kinds in ``needs``.

    Sums are kept in ``dtype`` (float64 makes them independent of summation order to float32
    precision, e.g. data-parallel shards). ``cross`` and ``residual`` also run the FP copy ``fp_block`` on the FP stream ``fp`` (same
    samples); ``taps`` maps residual writers to the module whose input is the residual stream at
    their add (the adapter's ``residual_taps``). Routed experts whose FP and quantized inputs hold
    different tokens get no ``cross`` term for that batch."""
    out = {n: {} for n in mods}
    if not needs:
        return out
    dev = q.device
    taps = {w: t for w, t in (taps or {}).items() if w in mods} if "residual" in needs else {}
    paired = fp_block is not None and fp is not None and bool({"cross", "residual"} & needs)
    for n, m in mods.items():
        if "gram" in needs:
            out[n]["gram"] = Gram.of(m.in_features, dev, dtype)
        if paired and "cross" in needs:
            out[n]["cross"] = Cross.of(m.in_features, dev, dtype)
    for w in taps:
        out[w]["residual"] = Residual.of(mods[w].out_features, mods[w].in_features, dev, dtype)
    tap_keys = {f"tap:{t}": t for t in taps.values()}
    q_mods = {**mods, **{k: block.get_submodule(t) for k, t in tap_keys.items()}}
    fp_mods = {**{n: fp_block.get_submodule(n) for n in mods},
               **{k: fp_block.get_submodule(t) for k, t in tap_keys.items()}} if paired else {}
    shared: dict = {}                                        # linear -> the one reading the same input first
    for sl in batches(q.shape[0], batch):
        xq = inputs_of(block, q_mods, q[sl], kwargs)
        xf = inputs_of(fp_block, fp_mods, fp[sl], kwargs) if paired else {}
        first = {}
        for n in mods:
            if n in xq:
                first.setdefault(_same_input_key(xq[n]), n)
        for n in mods:
            if n not in xq:                                  # an expert no token was routed to
                continue
            xs = samples(xq[n])
            if "gram" in out[n]:
                reader = first[_same_input_key(xq[n])]       # q/k/v, gate/up: one Gram per distinct input
                if shared.setdefault(n, reader) != reader:
                    raise RuntimeError(f"{n} read the same input as {shared[n]} in one batch and not in another")
                if reader == n:
                    for x in xs:
                        out[n]["gram"].add(x)
            if "cross" in out[n] and shared.get(n, n) == n and n in xf and xf[n].shape == xq[n].shape:
                for x_fp, x in zip(samples(xf[n]), xs):
                    out[n]["cross"].add(x_fp, x)
        for w, t in taps.items():
            r_fp, r_q = samples(xf[f"tap:{t}"]), samples(xq[f"tap:{t}"])
            for a, b, x in zip(r_fp, r_q, samples(xq[w])):
                out[w]["residual"].add(a, b, x)
    for n, reader in shared.items():                         # each linear its own copy of the shared sum
        if reader != n:
            g = out[reader]["gram"]
            out[n]["gram"] = Gram(g.sum.clone(), g.n)
            if "cross" in out[reader]:                       # the same FP/quantized input pair too
                c = out[reader]["cross"]
                out[n]["cross"] = Cross(c.sum.clone(), c.n)
    return out


def _same_input_key(x: torch.Tensor) -> tuple:
    """Equal for the inputs of linears fed the very same tensor in one forward (the hooks'
    detached views share its storage, shape and strides); distinct tensors alive together never
    share it."""
    return (x.data_ptr(), x.storage_offset(), tuple(x.shape), tuple(x.stride()), x.dtype)


def input_statistics(sk, inputs: torch.Tensor, kwargs: list[dict], reduce=None, batch: int = 8) -> dict:
    """One pass of the FP model over the calibration stream, block by block. For every
    quantizable linear: diag(X X^T) / N when ``reduce`` is None, else ``reduce(H)`` of its full
    input Gram H = X X^T / N. H is built once per input group (q/k/v, gate/up share it) and
    dropped after ``reduce``, so only one block's Grams are ever held."""
    out = {}
    h = inputs
    for i in range(len(sk.blocks)):
        block = sk.block(i)
        prefix = sk.block_prefix(i)
        heads = {g[0]: g for g in sk.adapter.linear_groups(block)}       # one hook per shared input
        kind = Gram if reduce else Diag
        acc = {n: kind.of(block.get_submodule(n).in_features, h.device) for n in heads}

        def sink(n, x):
            for s in samples(x):
                acc[n].add(s)
        with InputCollector({n: block.get_submodule(n) for n in heads}, sink, stop_early=False):
            h = run_block(block, h, kwargs[i], batch=batch)
        for n, g in heads.items():
            stat = reduce(acc[n].mean) if reduce else acc[n].mean
            stat = stat.cpu() if isinstance(stat, torch.Tensor) else stat
            for m in g:
                out[f"{prefix}.{m}"] = stat
        del acc
        sk.release_block(i)
    return out


def input_diagonals(sk, inputs: torch.Tensor, kwargs: list[dict], batch: int = 8) -> dict[str, torch.Tensor]:
    """diag(X X^T) / N of every quantizable linear's input (activation-aware planning)."""
    return input_statistics(sk, inputs, kwargs, batch=batch)
