"""The distillation loop over a student with trainable views (epoch-resumable)."""
from __future__ import annotations

import torch

from onecomp_core.sdk import bar, go_round, warmup_cosine

from .distill import entropy, hidden_cosine, kl_loss, sam_perturb, sam_restore, unfrozen
from .student import block_of, load_state, save_state

DISCRETE = ("codes",)


def param_groups(views: dict, o) -> list[dict]:
    """One Adam group per tensor: scale-like kinds at lr_scales relative to the tensor's RMS,
    code latents at lr_codes (grid steps), only when train_codes."""
    groups = []
    for name in sorted(views):
        for kind, params in views[name].param_groups().items():
            for p in params:
                if not p.requires_grad or (kind in DISCRETE and not o.train_codes):
                    p.requires_grad_(False)
                    continue
                rate = o.lr_codes if kind in DISCRETE else o.lr_scales * float(p.detach().pow(2).mean().sqrt().clamp_min(1e-8))
                groups.append({"params": [p], "lr": rate, "base_lr": rate, "module": name})
    return groups


def distill(student, teacher, views: dict, ids: torch.Tensor, o, state_path=None, log=None,
            sync=None, steps_per_epoch: int | None = None, save: bool = True) -> list[float]:
    """Train the views so the student's token distributions match the teacher's on ``ids``
    (N, L); -> mean loss per epoch. With ``state_path``, the views, the optimiser and the sample
    order are saved after every epoch (where ``save``) and a rerun continues after the last saved
    one. Data-parallel: ``ids`` is this rank's shard, ``sync(params)`` averages the gradients over
    the ranks before each step, and every rank takes ``steps_per_epoch`` steps (the most any rank
    needs: a rank with fewer samples goes round its shard again), so every rank steps alike."""
    groups = param_groups(views, o)
    if not groups or o.epochs == 0:
        return []
    opt = torch.optim.Adam([{k: v for k, v in g.items() if k != "module"} for g in groups])
    owners = [block_of(g["module"]) for g in groups]
    blocks = max(owners) + 1
    device = next(student.parameters()).device
    gen = torch.Generator().manual_seed(o.seed)
    steps_per_epoch = steps_per_epoch or -(-ids.shape[0] // o.batch)
    total = o.epochs * steps_per_epoch
    history, start = [], 0
    saved = load_state(state_path)
    if saved is not None:
        for name, sd in saved["views"].items():
            views[name].load_state_dict(sd)
        opt.load_state_dict(saved["opt"])
        gen.set_state(saved["rng"])
        history, start = list(saved["history"]), int(saved["epoch"])
    params = [g["params"][0] for g in opt.param_groups]
    student.train(bool(getattr(o, "checkpointing", False)))     # HF checkpointing acts in train mode only
    teacher.eval()
    hidden = o.hidden_weight > 0
    for epoch in range(start, o.epochs):
        live = set(unfrozen(epoch, o.epochs, blocks, o.progressive))
        for p, b in zip(params, owners):
            p.requires_grad_(b in live or b < 0)
        order = go_round(torch.randperm(ids.shape[0], generator=gen).tolist(), steps_per_epoch, o.batch)
        tot, seen, pbar = 0.0, 0, bar(steps_per_epoch, f"globalptq epoch {epoch + 1}/{o.epochs}")
        for k in range(steps_per_epoch):
            step = epoch * steps_per_epoch + k
            x = ids[order[k * o.batch:(k + 1) * o.batch]].to(device)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * warmup_cosine(step, total)
            with torch.no_grad():
                t_out = teacher(input_ids=x, output_hidden_states=hidden)

            def loss_fn():
                s_out = student(input_ids=x, output_hidden_states=hidden)
                loss = kl_loss(s_out.logits, t_out.logits, o.temperature)
                if hidden:
                    loss = loss + o.hidden_weight * hidden_cosine(s_out.hidden_states[1:], t_out.hidden_states[1:])
                if o.entropy_weight:
                    loss = loss - o.entropy_weight * entropy(s_out.logits, o.temperature)
                return loss

            opt.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = loss_fn()
                loss.backward()
                if o.sam_rho > 0:                  # SAM: the gradient at the worst nearby point
                    eps = sam_perturb(params, o.sam_rho)
                    opt.zero_grad(set_to_none=True)
                    loss_fn().backward()
                    sam_restore(params, eps)
            if sync is not None:
                sync(params)
            if o.clip:
                torch.nn.utils.clip_grad_norm_(params, o.clip)
            opt.step()
            seen += x.shape[0]
            tot += float(loss.detach()) * x.shape[0]
            pbar.update(1)
            pbar.set_postfix_str(f"loss={float(loss.detach()):.4f}")
        pbar.close()
        history.append(tot / max(seen, 1))
        if log:
            log(f"[globalptq] epoch {epoch + 1}/{o.epochs}: loss {history[-1]:.5f}")
        if state_path is not None and save:
            save_state(state_path, {"epoch": epoch + 1, "history": history, "rng": gen.get_state(),
                                    "views": {n: v.state_dict() for n, v in views.items()}, "opt": opt.state_dict()})
    return history
