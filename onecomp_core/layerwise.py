"""The layer-wise pass: block by block, two hidden-state streams (full precision and
quantized), per-linear statistics, corrections, projection in dependency order, commit."""
from __future__ import annotations

import copy
import time

import torch

from .components import GroupContext, LayerContext
from .stats import GramAccumulator, InputCollector
from .streams import block_error, run_block


def relative_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor | None) -> float:
    """||(W - W^) X||^2 / ||W X||^2 = tr(dW H dW^T) / tr(W H W^T) (Frobenius when H is None)."""
    d = W - Wq
    if H is None:
        return float((d * d).sum() / (W * W).sum().clamp_min(1e-30))
    return float(((d @ H) * d).sum() / ((W @ H) * W).sum().clamp_min(1e-30))


class LayerwisePass:
    def __init__(self, sk, plan, projectors, formats, corrections, store, hook, needs_hessian: bool):
        self.sk, self.plan, self.projectors, self.formats = sk, plan, projectors, formats
        self.corrections, self.store, self.hook = corrections, store, hook
        self.needs_hessian = needs_hessian
        self.wants_fp = any(c.wants_fp_inputs for c in corrections)
        self.passes = max((c.block_passes for c in corrections), default=1)

    def run(self, fp: torch.Tensor, q: torch.Tensor, kwargs: list[dict], start: int) -> dict:
        sk = self.sk
        total = len(sk.blocks)
        per_block_s = []
        for i in range(start, total):
            t0 = time.time()
            prefix = sk.block_prefix(i)
            block = sk.block(i)
            groups = [[n for n in g if f"{prefix}.{n}" in self.plan] for g in sk.adapter.linear_groups(block)]
            groups = [g for g in groups if g]
            self.hook.onecomp_block_start(index=i, total=total, layers=[n for g in groups for n in g])
            fp_next = run_block(block, fp, kwargs[i])                  # FP block on the FP stream
            fp_block = copy.deepcopy(block) if self.wants_fp else None  # FP weights, for paired inputs
            qts, info = {}, {}
            everything = {n for g in groups for n in g}
            writers = frozenset(sk.adapter.residual_taps(block))
            fp_w = {n: block.get_submodule(n).weight.detach().clone() for n in everything} if self.passes > 1 else {}
            err = None                                         # block error of the kept weights (passes > 1)
            for p in range(self.passes):
                done: set = set()
                for group in groups:
                    mods = {n: block.get_submodule(n) for n in group}
                    if p > 0:                                  # coordinate descent: relax again from FP
                        previous = self._snapshot(mods, prefix, qts, info)
                        err = block_error(block, q, fp_next, kwargs[i]) if err is None else err
                        with torch.no_grad():
                            for n, m in mods.items():
                                m.weight.copy_(fp_w[n])
                    gctx = GroupContext(block=block, prefix=prefix, group=list(group),
                                        quantized=set(done) if p == 0 else everything - set(group),
                                        q_inputs=q, fp_outputs=fp_next, kwargs=kwargs[i], pass_index=p,
                                        residual_writers=writers)
                    for c in self.corrections:
                        c.prepare_group(gctx)
                        c.begin_group([f"{prefix}.{n}" for n in group])
                    stats = self._statistics(block, mods, q, kwargs[i], fp_block, fp, prefix)
                    for rel, lin in mods.items():
                        name = f"{prefix}.{rel}"
                        qts[name], info[name] = self._quantize(name, lin, block, stats.get(rel))
                        info[name].update({"pass": p + 1, "passes": self.passes})
                        self.hook.onecomp_layer_done(block=i, name=name, info=info[name])
                    if p > 0:                                  # never worse than the last pass
                        after = block_error(block, q, fp_next, kwargs[i])
                        if after > err:
                            self._restore(mods, prefix, qts, info, previous)
                        else:
                            err = after
                    done.update(group)
            del fp_w
            q_next = run_block(block, q, kwargs[i])                    # quantized block, quantized stream
            fp, q = fp_next, q_next
            del fp_block
            tensors = self._block_tensors(block, prefix, qts)
            self.store.commit_block(i, tensors, {"fp": fp, "q": q}, info)
            sk.release_block(i)
            per_block_s.append(time.time() - t0)
            self.hook.onecomp_block_done(index=i, total=total, info={"seconds": per_block_s[-1]})
        return {"block_seconds": per_block_s}

    @staticmethod
    def _snapshot(mods, prefix, qts, info):
        return {n: (m.weight.detach().clone(), qts[f"{prefix}.{n}"], dict(info[f"{prefix}.{n}"]))
                for n, m in mods.items()}

    @staticmethod
    def _restore(mods, prefix, qts, info, previous):
        with torch.no_grad():
            for n, m in mods.items():
                w, qt, inf = previous[n]
                m.weight.copy_(w)
                qts[f"{prefix}.{n}"] = qt
                info[f"{prefix}.{n}"] = {**inf, "pass_rejected": True}

    def _statistics(self, block, mods, q, kwargs, fp_block=None, fp=None, prefix="") -> dict:
        """H of each linear in ``mods`` from the quantized stream; with ``fp_block``, also hand
        every correction the paired FP-stream inputs, sample by sample (per-layer sums only)."""
        if not self.needs_hessian:
            return {}
        acc = {n: GramAccumulator(m.in_features, q.device) for n, m in mods.items()}
        if fp_block is None:
            with InputCollector(mods, lambda n, x: acc[n].add(x)) as col:
                for s in range(q.shape[0]):
                    col.run(lambda: block(q[s:s + 1], **kwargs))
            return {n: a.H for n, a in acc.items()}
        taps = {w: t for w, t in self.sk.adapter.residual_taps(block).items() if w in mods}
        tap_names = {f"tap:{t}": t for t in taps.values()}
        q_mods = {**mods, **{k: block.get_submodule(t) for k, t in tap_names.items()}}
        fp_mods = {**{n: fp_block.get_submodule(n) for n in mods},
                   **{k: fp_block.get_submodule(t) for k, t in tap_names.items()}}
        for s in range(q.shape[0]):
            xq, xf = {}, {}
            with InputCollector(q_mods, xq.__setitem__) as col:
                col.run(lambda: block(q[s:s + 1], **kwargs))
            with InputCollector(fp_mods, xf.__setitem__) as col:
                col.run(lambda: fp_block(fp[s:s + 1], **kwargs))
            for n in mods:
                if n not in xq:                              # an expert no token was routed to
                    continue
                x = xq[n]
                acc[n].add(x)
                if n in xf and xf[n].shape == x.shape:     # routed experts may see other tokens
                    for c in self.corrections:
                        c.observe(f"{prefix}.{n}", xf[n], x)
            for w, t in taps.items():
                for c in self.corrections:
                    c.observe_residual(f"{prefix}.{w}", xf[f"tap:{t}"], xq[f"tap:{t}"])
        return {n: a.H for n, a in acc.items()}

    def _quantize(self, name, lin, block, H):
        spec = self.plan[name]
        fmt = self.formats[spec.format]
        W = lin.weight.detach().float().clone()
        ctx = LayerContext(name=name, spec=spec, weight=W, target=W, H=H, stats={}, module=lin,
                           block=block, fmt=fmt)
        t0 = time.time()
        for c in self.corrections:
            ctx.target = c.adjust_target(ctx)
        qt = self.projectors[spec.projector].project(ctx.target, H, spec, fmt)
        for c in self.corrections:
            qt = c.after_projection(ctx, qt)
        Wq = qt.dequantize(torch.float32)
        with torch.no_grad():
            lin.weight.copy_(Wq.to(lin.weight.dtype))
        return qt, {"rel_error": relative_error(W, Wq, H), "seconds": time.time() - t0,
                    "bits": spec.bits, "group_size": spec.group_size, "projector": spec.projector,
                    "format": spec.format, "bpw": fmt.stored_bits_per_weight(spec, tuple(W.shape), qt),
                    **fmt.structure(qt)}

    def _block_tensors(self, block, prefix, qts) -> dict:
        """The block as saved: quantized linears in their format's layout, the rest as is."""
        dtype = self.sk.checkpoint_dtype
        out = {}
        for name, qt in qts.items():
            spec = self.plan[name]
            out.update(self.formats[spec.format].to_tensors(name, qt, dtype))
        for pname, t in block.state_dict().items():
            full = f"{prefix}.{pname}"
            owner = full.rsplit(".", 1)[0]
            if owner in qts and full.endswith(".weight"):
                continue
            out[full] = t.to(dtype) if t.is_floating_point() else t
        return out
