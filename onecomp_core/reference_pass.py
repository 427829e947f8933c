"""The reference model's evaluation pass one decoder block at a time: only one block, the outer
parts and the windows' hidden states are ever resident, so measuring the reference costs a
fraction of the model's memory (the rest of evaluation then holds the evaluated model alone).

All windows of one length enter block 0 together (captured as the layer-wise pass captures its
calibration streams), every block is loaded, applied to them and released in turn, and the final
hidden states are replayed through the model's outer forward (final norm, head) window by window.
Where the model's logits are not its head's output as is (checked on the first window), or no
adapter knows the architecture, the reference is loaded whole as before."""
from __future__ import annotations

from collections import defaultdict

import torch

from .errors import OnecompError
from .evaluate import ReferenceLogProbs, _window_inputs, head_alone_gives_logits, load_reference
from .resources import release_memory
from .streams import capture, replaying, run_block


def measure_reference(model_spec: str, ids: torch.Tensor, seq_len: int = 512, stride: int | None = None,
                      bos: int | None = None, device: str = "auto", dtype: str = "auto",
                      plugins=None) -> ReferenceLogProbs:
    """The reference's :class:`ReferenceLogProbs` for these windows, by the streamed pass where it
    applies, else with the model loaded whole."""
    sk = _skeleton(model_spec, device, dtype, plugins)
    if sk is not None and (not isinstance(sk.model.get_output_embeddings(), torch.nn.Linear)
                           or getattr(sk.config, "final_logit_softcapping", None) is not None):
        sk = None                # known before the pass: its logits are not its head's output as is
    if sk is not None:
        ref = _streamed(sk, ids, seq_len, stride, bos)
        if ref is not None:
            return ref
    return ReferenceLogProbs.of_model(load_reference(model_spec, device, dtype)[0], ids, seq_len, stride, bos)


def _skeleton(model_spec, device, dtype, plugins):
    """The reference as an empty skeleton whose blocks load one at a time (None: no adapter)."""
    from .model_source import resolve_model
    from .plugins import load_plugins
    from .skeleton import Skeleton, pick_device
    folder = resolve_model(model_spec)
    registry = (plugins or load_plugins()).registry
    try:
        return Skeleton(folder, registry, pick_device(device), dtype)
    except OnecompError as exc:
        if "unsupported architecture" in str(exc):
            return None
        raise


@torch.no_grad()
def _streamed(sk, ids, seq_len, stride, bos) -> ReferenceLogProbs | None:
    windows = list(_window_inputs(ids, seq_len, stride, bos))
    by_length = defaultdict(list)                 # windows of one length share the blocks' call arguments
    for w, (x, _) in enumerate(windows):
        by_length[x.shape[1]].append(w)
    streams = {}
    for length, ws in by_length.items():
        streams[length] = capture(sk, torch.cat([windows[w][0] for w in ws]))
    for i in range(len(sk.blocks)):
        block = sk.block(i)
        for h, kwargs in streams.values():
            run_block(block, h, kwargs[i], out=h)  # in place: sample by sample
        sk.release_block(i)
        release_memory()      # else the C heap keeps each released block's pages and grows by one per block
    final = {w: streams[length][0][k:k + 1] for length, ws in by_length.items() for k, w in enumerate(ws)}
    return _through_head(sk, windows, final, ids, seq_len, stride, bos)


def _through_head(sk, windows, final, ids, seq_len, stride, bos) -> ReferenceLogProbs | None:
    """The outer forward (final norm, head) on each window's last block output; None where the
    model's logits are not its head's output (the caller then loads it whole)."""
    model, head = sk.model, sk.model.get_output_embeddings()      # a Linear (measure_reference checked)
    tied = bool(getattr(sk.config, "tie_word_embeddings", False))
    for name, mod in sk.outer_modules():          # a tied head is the embedding, not a second copy
        if not (tied and mod is head):
            sk.fill(mod, name)
    if tied:
        head.weight = model.get_input_embeddings().weight
    base = getattr(model, model.base_model_prefix)
    out = ReferenceLogProbs(ids, seq_len, stride, bos)
    try:
        with replaying(sk) as stand_ins:
            for w, (x, lo) in enumerate(windows):
                x = x.to(sk.device)
                if w == 0:                        # once: the full forward's logits = the head's output?
                    stand_ins[0].output = final[w][:, :64]
                    if not head_alone_gives_logits(model(input_ids=x[:, :64]).logits[0],
                                                   head(base(input_ids=x[:, :64], use_cache=False).last_hidden_state[0])):
                        return None
                stand_ins[0].output = final[w]
                h = base(input_ids=x, use_cache=False).last_hidden_state[0, :-1][lo:]
                out.add_window(lambda c: head(h[c]).float(), head.out_features, x[0, 1:][lo:], h)
        out.keep_head(head, copy=False)          # our own memory: released with the skeleton otherwise
        return out
    finally:
        sk.release_outer()

