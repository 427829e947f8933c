"""Block-wise compensation: before a group of linears is quantized, a few Adam steps on the
block's still-FP linears so that the partly quantized block, on the quantized stream, matches
the FP block's output on the FP stream:  min ||B_q(h^) - B_fp(h)||^2 over the FP linears.
The steps are kept only if they lower that error on the evaluation samples."""
from __future__ import annotations

import torch

from onecomp_core.sdk import block_error


def compensate(block, params: list[torch.nn.Parameter], inputs, targets, kwargs, *, steps: int, lr: float,
               batch: int, eval_samples: int, seed: int) -> dict:
    """Adam on ``params`` (relative lr: scaled by each tensor's RMS); -> {before, after, kept}."""
    if not params or steps == 0:
        return {"before": None, "after": None, "kept": False}
    n = inputs.shape[0]
    g = torch.Generator().manual_seed(seed)
    rows_eval = torch.randperm(n, generator=g)[: min(eval_samples, n)].tolist()
    before = block_error(block, inputs, targets, kwargs, rows_eval)
    saved = [p.detach().clone() for p in params]
    flags = [p.requires_grad for p in block.parameters()]
    for p in block.parameters():
        p.requires_grad_(False)
    groups = [{"params": [p], "lr": lr * float(p.detach().float().pow(2).mean().sqrt().clamp_min(1e-8))}
              for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(groups)
    try:
        for _ in range(steps):
            rows = torch.randint(0, n, (min(batch, n),), generator=g).tolist()
            opt.zero_grad(set_to_none=True)
            loss = 0.0
            with torch.enable_grad():
                for s in rows:
                    y = block(inputs[s:s + 1], **kwargs)
                    y = y[0] if isinstance(y, tuple) else y
                    loss = loss + ((y.float() - targets[s:s + 1].float()) ** 2).mean() / len(rows)
                loss.backward()
            opt.step()
    finally:
        for p, f in zip(block.parameters(), flags):
            p.requires_grad_(f)
    after = block_error(block, inputs, targets, kwargs, rows_eval)
    kept = after < before
    if not kept:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    return {"before": before, "after": after, "kept": kept}
