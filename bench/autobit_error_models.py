"""How well does each AutoBit error model predict the real damage? For every linear of
SmolLM2-135M: quantize that module alone by RTN at one candidate (default 2b/g128), measure
the KL of the model to FP on held-out text, and compare with the predicted errors
(frobenius, activation = input Gram diagonal, activation+curvature = also the output-gradient
diagonal). The ILP adds errors across modules, so what matters is that prediction and damage
are proportional across modules: we print the rank correlation, the correlation of logs, the
spread of log(KL / prediction) and the overlap of the 20 most damaging modules.
Prints one JSON line per module and one summary object."""
from __future__ import annotations

import argparse
import json
import math

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common import CALIB, EVAL
from onecomp_core.calibration import calibration_samples
from onecomp_core.evaluate import text_tokens
from onecomp_core.formats import grid
from onecomp_core.model_source import resolve_model
from onecomp_plugin_autobit.errors import candidate_error, output_curvature

MODELS = ("frobenius", "activation", "activation+curvature")


def input_diagonals(model, ids, names):
    sums, counts = {n: 0 for n in names}, {n: 0 for n in names}

    def hook(n):
        def f(m, i, o):
            x = i[0].reshape(-1, i[0].shape[-1])
            sums[n] = sums[n] + (x * x).sum(0)
            counts[n] += x.shape[0]
        return f
    hs = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    with torch.no_grad():
        for row in ids:
            model(input_ids=row[None])
    for h in hs:
        h.remove()
    return {n: sums[n] / counts[n] for n in names}


def ranks(v):
    order = sorted(range(len(v)), key=v.__getitem__)
    r = [0] * len(v)
    for k, i in enumerate(order):
        r[i] = k
    return r


def pearson(a, b):
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    num = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    return num / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))


def agreement(kl, pred, top=20):
    lk = [math.log(max(x, 1e-12)) for x in kl]
    lp = [math.log(max(x, 1e-30)) for x in pred]
    ratio = [a - b for a, b in zip(lk, lp)]
    mean = sum(ratio) / len(ratio)
    worst = lambda v: set(sorted(range(len(v)), key=lambda i: -v[i])[:top])  # noqa: E731
    return {"spearman": round(pearson(ranks(kl), ranks(pred)), 3), "log_pearson": round(pearson(lk, lp), 3),
            "sd_log_ratio": round(math.sqrt(sum((x - mean) ** 2 for x in ratio) / len(ratio)), 3),
            f"top{top}_overlap": len(worst(kl) & worst(pred))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--samples", type=int, default=8, help="calibration samples of 512 tokens")
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--limit", type=int, default=0, help="only the first N modules (0: all)")
    a = ap.parse_args()
    torch.manual_seed(0)
    folder = resolve_model("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = calibration_samples(str(CALIB), tok, a.samples, 512, "drop_rand", 0, "text", "train", False)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    names = names[:a.limit] if a.limit else names
    A = input_diagonals(model, ids, names)
    B = output_curvature(folder, ids, names, max_samples=a.samples)
    held = text_tokens(tok, str(EVAL), a.eval_tokens).reshape(-1, 256)
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=held).logits, -1)
    rows = []
    for n in names:
        lin = model.get_submodule(n)
        W = lin.weight.data.clone()
        codes, scale, zero = grid.rtn(W, a.bits, a.group_size, False)
        cols = W.shape[1]
        lin.weight.data = grid.dequantize(codes.float(), grid.expand(scale, cols, a.group_size),
                                          grid.expand(zero, cols, a.group_size))
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=held).logits, -1)
        lin.weight.data = W
        row = {"module": n, "kl": float((ref.exp() * (ref - lp)).sum(-1).mean()),
               "frobenius": candidate_error(W, a.bits, a.group_size, False),
               "activation": candidate_error(W, a.bits, a.group_size, False, A[n]),
               "activation+curvature": candidate_error(W, a.bits, a.group_size, False, A[n], B[n])}
        rows.append(row)
        print(json.dumps(row), flush=True)
    kl = [r["kl"] for r in rows]
    print(json.dumps({"bench": "autobit_error_models", "candidate": f"{a.bits}b/g{a.group_size}",
                      "modules": len(rows), "calibration_samples": a.samples, "eval_tokens": a.eval_tokens,
                      "agreement_with_measured_kl": {m: agreement(kl, [r[m] for r in rows]) for m in MODELS}}))


if __name__ == "__main__":
    main()
