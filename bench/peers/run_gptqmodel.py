"""Runs inside the GPTQModel venv: GPTQ with GPTQModel's defaults (only bits, group size and the
grid set) on the given calibration tokens, saved in GPTQModel's format, then read back by
GPTQModel's own loader and each quantized linear dequantized by its own module into
OUT/dense.safetensors. Prints one JSON line: seconds, peak RSS.

    python run_gptqmodel.py MODEL_DIR TOKENS.pt OUT --bits 4 --group-size 128 [--sym]
"""
import argparse
import json
import resource
import time

import torch


def dump_dense(out: str) -> None:
    from gptqmodel import GPTQModel
    from safetensors.torch import save_file
    m = GPTQModel.load(out, device="cpu")
    dense = {}
    for name, mod in m.model.named_modules():
        if hasattr(mod, "dequantize_weight") and hasattr(mod, "in_features"):
            w = mod.dequantize_weight().detach().float()
            if w.shape == (mod.in_features, mod.out_features):
                w = w.T                                  # GPTQ's packed layout is (in, out)
            if w.shape != (mod.out_features, mod.in_features):
                raise SystemExit(f"{name}: dequantized weight has shape {tuple(w.shape)}")
            dense[f"{name}.weight"] = w.contiguous()
    save_file(dense, f"{out}/dense.safetensors")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("tokens")
    ap.add_argument("out")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--sym", action="store_true")
    a = ap.parse_args()
    from gptqmodel import GPTQModel, QuantizeConfig
    ids = torch.load(a.tokens)
    calib = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in ids]
    cfg = QuantizeConfig(bits=a.bits, group_size=a.group_size, sym=a.sym)
    t0 = time.time()
    model = GPTQModel.load(a.model, cfg, device="cpu")
    model.quantize(calib, batch_size=1)
    secs = time.time() - t0
    model.save(a.out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    del model
    dump_dense(a.out)
    print(json.dumps({"tool": "gptqmodel", "seconds": round(secs, 1), "peak_rss_mb": round(peak, 1)}))


if __name__ == "__main__":
    main()
