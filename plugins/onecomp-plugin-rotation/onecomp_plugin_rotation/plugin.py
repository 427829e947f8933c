"""Plugin glue: the ``hadamard`` preprocessor and its transform, applied to each block as it loads."""
from __future__ import annotations

import attrs
import torch

from onecomp_core.sdk import (OnecompError, Preprocessor, Transform, boolean, cast_floats, hookimpl, human_bytes,
                              in_range, one_of, rss_bytes)

from .fuse import columns_times, fold_norm, rotate_heads_columns, rotate_heads_rows, rows_times
from .hadamard import largest_order, rotation
from .spinquant import cayley_step, effective_params, orthonormalise, token_kl


@attrs.define(frozen=True)
class HadamardOptions:
    seed: int = attrs.field(default=0, validator=in_range(0, 2**31 - 1))
    r2: bool = attrs.field(default=True, validator=boolean)            # also rotate each head's value/output pair
    online_down: bool = attrs.field(default=False, validator=boolean)


class HadamardRotation(Transform):
    """R1 on the residual stream (norms folded first), R2 on each head's value/output pair."""

    def __init__(self, adapter, R1: torch.Tensor, R2: torch.Tensor | None, tied: bool, arch: str):
        self.adapter, self.R1, self.R2, self.tied, self.arch = adapter, R1, R2, tied, arch
        self.untied = False

    def apply_block(self, index, block):
        lay = layout_of(self.adapter, block, self.arch)
        R1 = self.R1.to(next(block.parameters()).device)
        for norm, readers in lay.norms.items():                       # W <- W diag(g) R1
            fold_norm(block.get_submodule(norm).weight, lay.offset,
                      [block.get_submodule(r).weight for r in readers], R1)
        for name in lay.writers:                                      # W <- R1^T W, b <- R1^T b
            lin = block.get_submodule(name)
            rows_times(lin.weight, R1.T)
            if lin.bias is not None:
                rows_times(lin.bias, R1.T)
        if self.R2 is not None:
            v_name, first = lay.value
            v = block.get_submodule(v_name)
            kv_heads = (v.out_features - first) // lay.head_dim
            rotate_heads_rows(v.weight, first, kv_heads, self.R2)
            if v.bias is not None:
                rotate_heads_rows(v.bias, first, kv_heads, self.R2)
            rotate_heads_columns(block.get_submodule(lay.output).weight, self.R2)

    def apply_final(self, norm, head):
        if head is None or norm is None:
            raise OnecompError(f"hadamard: {self.arch} has no final norm and head the adapter names; "
                               f"the rotation cannot be undone at the output")
        offset = self.adapter.norm_offset(None, "norm")
        g = offset + norm.weight.detach().double()
        if self.tied and not torch.all(g == 1):
            self.untied = True                   # the head now differs from the embedding
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)   # its own tensor
        fold_norm(norm.weight, offset, [head.weight], torch.eye(g.numel(), dtype=torch.float64))

    def apply_outer(self, embeddings, head):
        columns_times(embeddings.weight, self.R1)                    # E <- E R1
        if head is not None:
            columns_times(head.weight, self.R1)                      # W <- W diag(g) R1 (g folded above)

    def checkpoint_config(self):
        return {"tie_word_embeddings": False} if self.untied else {}

    def describe(self):
        return {"hidden": self.R1.shape[0], "head_dim": None if self.R2 is None else self.R2.shape[0],
                "hadamard_order": largest_order(self.R1.shape[0]), "untied_head": self.untied,
                **getattr(self, "learned", {})}


def layout_of(adapter, block, arch: str):
    lay = adapter.residual_layout(block)
    if lay is None:
        raise OnecompError(f"hadamard cannot rotate {arch} exactly: its blocks normalise attention/MLP outputs "
                           f"before the residual add (post-norms); drop --preprocessor hadamard for this model")
    return lay


class Hadamard(Preprocessor):
    """Randomised Hadamard rotations fused into the weights (QuaRot-style, weights only): a
    function-preserving transform that spreads outlier channels before quantization."""
    name = "hadamard"
    Options = HadamardOptions

    def fit(self, ctx):
        o = self.options
        cfg = ctx.model_config
        arch = getattr(cfg, "model_type", "?")
        if o.online_down:
            raise OnecompError("hadamard.online_down=true needs a format and loader that apply a Hadamard before "
                               "down_proj at run time; none is installed: leave hadamard.online_down=false")
        block = ctx.block(0)
        try:
            lay = layout_of(ctx.adapter, block, arch)
        finally:
            ctx.release(0)
        R1 = rotation(int(cfg.hidden_size), o.seed)
        R2 = rotation(lay.head_dim, o.seed + 1) if o.r2 else None
        return HadamardRotation(ctx.adapter, R1, R2, bool(getattr(cfg, "tie_word_embeddings", False)), arch)




@attrs.define(frozen=True)
class SpinQuantOptions:
    seed: int = attrs.field(default=0, validator=in_range(0, 2**31 - 1))
    steps: int = attrs.field(default=40, validator=in_range(1, 100_000))
    lr: float = attrs.field(default=1.5, validator=in_range(0.0, 100.0))
    samples: int = attrs.field(default=8, validator=in_range(1, 1 << 20))    # calibration samples it learns on
    heldout: int = attrs.field(default=4, validator=in_range(0, 1 << 20))    # further samples judging the result
    loss: str = attrs.field(default="kl", validator=one_of("kl", "ce"))      # KL to the FP model, or next-token CE
    clip_steps: int = attrs.field(default=0, validator=in_range(0, 1000))     # fake quantizer's clipping search; 0: min/max
    r2: bool = attrs.field(default=True, validator=boolean)


def _learn_bytes(cfg, samples_len: int, cached: int = 0) -> int:
    """Rough peak of SpinQuant's learning, in float32: the whole model (blocks, embedding, head),
    the head's work (its weight times the norm gain, that times R1, and the gradient of that
    product: three vocabulary-by-hidden matrices), each block's checkpointed input and its
    recomputed activations, and logits-sized tensors: six of one step's loss (logits, their
    log-softmax, p_FP, the difference, the product and the logits' gradient) plus the FP model's
    log-probabilities of ``cached`` sequences (the KL loss's teacher). Measured on SmolLM2-135M
    (four settings): 3600-3706 MB against 3077 MB predicted before the head's work and the loss's
    temporaries were counted (they add ~610 MB there)."""
    d, layers = int(cfg.hidden_size), int(cfg.num_hidden_layers)
    inter = int(getattr(cfg, "intermediate_size", 4 * d)) * int(getattr(cfg, "num_local_experts", 1) or 1)
    per_block = 4 * d * d + 3 * d * inter
    vocab = int(cfg.vocab_size)
    model = 4 * (layers * per_block + 2 * vocab * d)
    head_work = 4 * 3 * vocab * d
    acts = 4 * 12 * layers * samples_len * d
    logits = 4 * (6 + cached) * samples_len * vocab
    return model + head_work + acts + logits


class SpinQuant(Preprocessor):
    """SpinQuant (Liu et al.): R1 and R2 learned by Cayley SGD against the loss (KL to the FP
    model by default, or next-token cross-entropy) of the model with its weights rotated and
    fake-quantized to the run's grid, from the Hadamard rotations, kept only if the loss on
    held-out samples fell; the learned rotations are fused like ``hadamard``'s. Needs the whole
    model."""
    name = "spinquant"
    Options = SpinQuantOptions

    def fit(self, ctx):
        o, run, cfg, adapter = self.options, ctx.run, ctx.model_config, ctx.adapter
        arch = getattr(cfg, "model_type", "?")
        x0, kwargs = ctx.inputs()
        ids = ctx.calibration_ids
        n = min(o.samples, x0.shape[0])
        m = min(o.heldout, x0.shape[0] - n)                           # held-out: the samples after the training ones
        cached = n + m if o.loss == "kl" else 0
        need = rss_bytes() + _learn_bytes(cfg, x0.shape[1], cached)   # what the process holds now, plus the learning
        if ctx.max_memory is not None and need > ctx.max_memory:
            raise OnecompError(f"spinquant needs ~{human_bytes(need)} to learn its rotations (the whole model "
                               f"resident), max-memory {human_bytes(ctx.max_memory)}: raise --max-memory or use "
                               f"--preprocessor hadamard")
        blocks = [ctx.block(i) for i in range(ctx.num_blocks)]
        try:
            t = self._learn(ctx, blocks, x0[:n + m].float(), kwargs, ids[:n + m], n, arch)
            t.learned["predicted_peak_mb"] = round(need / 2**20, 1)
            return t
        finally:
            for i in range(ctx.num_blocks):
                ctx.release(i)
            if ctx.release_outer is not None:
                ctx.release_outer()

    def _learn(self, ctx, blocks, x0, kwargs, ids, n, arch):
        """Learn on the first ``n`` of ``x0``/``ids``; judge on the rest (on the first ``n`` where
        there is no rest)."""
        import torch.nn.functional as F
        from torch.func import functional_call
        from torch.utils.checkpoint import checkpoint
        from onecomp_core.sdk import bar
        o, run, cfg, adapter = self.options, ctx.run, ctx.model_config, ctx.adapter
        lays = [layout_of(adapter, b, arch) for b in blocks]
        quantized = [{n for g in adapter.linear_groups(b) for n in g} for b in blocks]
        for b in blocks:
            b.float().requires_grad_(False)
        if ctx.outer is None:
            raise OnecompError(f"spinquant: no final norm and head to measure the loss with ({arch})")
        norm, head = ctx.outer()
        c = adapter.norm_offset(None, "norm")
        Wh = (head.weight.detach().float() * (c + norm.weight.detach().float())[None, :])
        flat = {"weight": torch.full_like(norm.weight.detach().float(), 1.0 - c)}
        grid_args = (run.bits, run.group_size, run.symmetric, o.clip_steps)
        dev = x0.device

        teacher = {}

        def teacher_logp(k):
            """log p of the FP model on sample k (rotations leave the FP function as it is)."""
            if k not in teacher:
                with torch.no_grad():
                    x = x0[k:k + 1]
                    for i, blk in enumerate(blocks):
                        y = blk(x, **cast_floats(kwargs[i], torch.float32))
                        x = y[0] if isinstance(y, tuple) else y
                    teacher[k] = F.log_softmax(functional_call(norm.float(), flat, (x,)) @ Wh.T, -1)[0]
            return teacher[k]

        def loss_of(R1, R2, k):
            x = x0[k:k + 1] @ R1
            for i, blk in enumerate(blocks):
                def step(x, R1, R2, i=i, blk=blk):
                    p = effective_params(blk, lays[i], R1, R2, quantized[i], grid_args)
                    y = functional_call(blk, p, (x,), cast_floats(kwargs[i], torch.float32))
                    return y[0] if isinstance(y, tuple) else y
                x = checkpoint(step, x, R1, R2, use_reentrant=False)
            h = functional_call(norm.float(), flat, (x,))
            logits = h @ (Wh @ R1).T
            if o.loss == "kl":
                return token_kl(logits[0], teacher_logp(k))
            return F.cross_entropy(logits[0, :-1], ids[k, 1:].to(dev))

        judge = range(n, x0.shape[0]) if x0.shape[0] > n else range(n)

        def objective(R1, R2):
            with torch.no_grad():
                return sum(float(loss_of(R1, R2, k)) for k in judge) / len(judge)

        R1 = rotation(int(cfg.hidden_size), o.seed).float().to(dev)
        R2 = rotation(lays[0].head_dim, o.seed + 1).float().to(dev) if o.r2 else None
        start = (R1.clone(), None if R2 is None else R2.clone())
        loss_start = objective(R1, R2)
        with bar(o.steps, "spinquant", "step") as progress:
            for t in range(o.steps):
                lr = o.lr * (1 - t / o.steps)                                     # linear decay
                r1 = R1.clone().requires_grad_(True)
                r2 = None if R2 is None else R2.clone().requires_grad_(True)
                with torch.enable_grad():
                    loss = loss_of(r1, r2, t % n)
                    grads = torch.autograd.grad(loss, [r for r in (r1, r2) if r is not None])
                R1 = cayley_step(R1, grads[0], lr)
                if R2 is not None:
                    R2 = cayley_step(R2, grads[1], lr)
                progress.update()
        R1, R2 = orthonormalise(R1).float(), None if R2 is None else orthonormalise(R2).float()
        loss_end = objective(R1, R2)
        kept = loss_end < loss_start
        if not kept:                                  # never worse than the Hadamard start on held-out samples
            R1, R2 = start
        t = HadamardRotation(adapter, R1.double(), None if R2 is None else R2.double(),
                             bool(getattr(cfg, "tie_word_embeddings", False)), arch)
        t.learned = {"steps": o.steps, "loss": o.loss, "clip_steps": o.clip_steps, "heldout_samples": x0.shape[0] - n,
                     "loss_start": round(loss_start, 5), "loss_end": round(loss_end, 5), "kept_learned": kept}
        return t


@hookimpl
def onecomp_register_preprocessors(registry):
    registry.add_preprocessor(Hadamard)
    registry.add_preprocessor(SpinQuant)
