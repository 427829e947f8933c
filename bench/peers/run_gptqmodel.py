"""Runs inside the GPTQModel venv: GPTQ with GPTQModel's defaults (only bits, group size and the
grid set; per-channel also turns off group-aware reordering, which refuses group size -1) on the given calibration tokens, saved in GPTQModel's format, then read back by
GPTQModel's own loader and each quantized linear dequantized by its own module into
OUT/dense.safetensors. Prints one JSON line: seconds, peak RSS.

    python run_gptqmodel.py MODEL_DIR TOKENS.pt OUT --bits 4 --group-size 128 [--sym]
"""
import torch

import peer_cli


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
    a = peer_cli.args()
    from gptqmodel import GPTQModel, QuantizeConfig
    ids = torch.load(a.tokens)
    calib = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in ids]
    # its group-aware reordering refuses per-channel ("requires group_size > 0"): off there only
    extra = {"act_group_aware": False} if a.group_size == -1 else {}
    cfg = QuantizeConfig(bits=a.bits, group_size=a.group_size, sym=a.sym, **extra)

    def quantize():
        model = GPTQModel.load(a.model, cfg, device="cpu")
        model.quantize(calib, batch_size=1)
        return model
    peer_cli.measured("gptqmodel", quantize, lambda model: model.save(a.out), dump_dense, a.out)


if __name__ == "__main__":
    main()
