"""Layer-level quality of the binary-factor fit on SmolLM2-135M: for a few real modules, the
relative weighted error ||(W - L R^T) H^1/2||^2 / ||W H^1/2||^2 that DBF (l = 1) and MDBF
(l = 2) leave at 1.0, 1.5 and 2.0 bpw, with the full input Gram H of the FP model on the usual
32 x 512 calibration tokens, and the seconds per fit. A quick way to compare ADMM settings
(--iters, --rho, --rho-end, --damp) before spending a model run on them. With --heldout the same
factors are also scored under the Gram of 32 x 512 tokens of enwiki_eval (text the fit never
saw): how much of a fit's advantage carries to other inputs. With --same-k DBF is also fitted
at MDBF's (smaller) k: the split of MDBF's gap into what the second envelope rank buys at equal k
and what the sign columns it pays for would have bought. Prints one JSON line per fit, then one
JSON object with all of them."""
from __future__ import annotations

import argparse
import json
import time

import torch

from common import CALIB, EVAL
from onecomp_core.calibration import calibration_samples
from onecomp_core.model_source import resolve_model
from onecomp_core.stats import GramAccumulator
from onecomp_plugins_dbf.factors import Metric, compose, fit, rank_for_bpw

MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
ALL = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
       "mlp.up_proj", "mlp.down_proj")


def grams(layers: list[int], texts: list[tuple[str, int]], modules=MODULES) -> list[dict]:
    """For each (text, n), (W, H) of each chosen module, H = X^T X / tokens of its FP inputs on
    n x 512 tokens of that text (the pipeline's GramAccumulator); the model is loaded once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = resolve_model("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    mods = {f"{li}.{name}": model.model.layers[li].get_submodule(name) for li in layers for name in modules}
    acc = {}
    for key, mod in mods.items():
        mod.register_forward_pre_hook(lambda _, inp, key=key: acc[key].add(inp[0]))
    per_text = []
    for text, samples in texts:
        acc.update({key: GramAccumulator(mod.in_features, "cpu") for key, mod in mods.items()})
        ids = calibration_samples(text, tok, samples, 512)
        with torch.no_grad():
            for i in range(0, ids.shape[0], 4):
                model(ids[i:i + 4])
        per_text.append({key: (mod.weight.detach(), acc[key].H) for key, mod in mods.items()})
    return per_text


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="3,15,27")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--rho", type=float, default=0.02)
    ap.add_argument("--rho-end", type=float, default=4.0)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--polish", type=int, default=16, help="rounds of sign flips and envelope updates after the ADMM")
    ap.add_argument("--bpw", default="1.0,1.5,2.0")
    ap.add_argument("--modules", choices=("five", "all"), default="five",
                    help="five: q, k, o, gate, down; all: also v_proj and up_proj")
    ap.add_argument("--heldout", action="store_true", help="also score each fit under the enwiki_eval Gram")
    ap.add_argument("--same-k", action="store_true", help="also fit DBF (l = 1) at the k of MDBF (l = 2)")
    ap.add_argument("--samples", type=int, default=32, help="calibration sequences of 512 tokens the fit's Gram sees")
    a = ap.parse_args()
    layers, modules = [int(x) for x in a.layers.split(",")], MODULES if a.modules == "five" else ALL
    fitted, *held = grams(layers, [(str(CALIB), a.samples), *([(str(EVAL), 32)] if a.heldout else [])], modules)
    rows = []
    for key, (W, H) in fitted.items():
        W = W.float()
        out, cols = W.shape
        scores = {"rel_error": Metric.of(H, cols, W.device)}     # the error as the fit sees it (damp 0.01)
        if a.heldout:
            scores["heldout_error"] = Metric.of(held[0][key][1], cols, W.device)
        totals = {name: m.error(W, torch.zeros(out, 1), torch.zeros(cols, 1)) for name, m in scores.items()}
        for bpw in (float(x) for x in a.bpw.split(",")):
            fits = [(l, rank_for_bpw(out, cols, bpw, l), f"l={l}") for l in (1, 2)]
            if a.same_k:                      # DBF with only the sign columns MDBF can afford
                fits.append((1, fits[1][1], "l=1 at k of l=2"))
            for l, k, label in fits:
                t = time.perf_counter()
                Sa, A, P, Sb, B, G = fit(W, k, l, H, iters=a.iters, rho=a.rho, rho_end=a.rho_end, damp=a.damp, polish=a.polish)
                r = {"module": key, "bpw": bpw, "l": l, "k": k, "fit": label, "seconds": round(time.perf_counter() - t, 2)}
                L, R = compose(Sa, A, P), compose(Sb, B, G)
                r.update({name: round(m.error(W, L, R) / totals[name], 4) for name, m in scores.items()})
                rows.append(r)
                print(json.dumps(r), flush=True)
    sums = {}
    for r in rows:     # per (bpw, fit): the errors summed over modules, for a one-line comparison
        s = sums.setdefault(f"{r['bpw']} {r['fit']}", {n: 0.0 for n in r if n.endswith("error")})
        for n in s:
            s[n] = round(s[n] + r[n], 4)
    print(json.dumps({"bench": "binary_layers_smollm2", "iters": a.iters, "rho": a.rho, "rho_end": a.rho_end,
                      "damp": a.damp, "polish": a.polish, "samples": a.samples, "same_k": a.same_k, "layers": a.layers, "modules": a.modules, "sums": sums, "results": rows}))


if __name__ == "__main__":
    main()
