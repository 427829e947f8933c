"""Runs inside the OneComp 1.4 venv (Python >= 3.12): GPTQ with QEP in front, OneComp's defaults
(only bits, group size and the grid set; weights loaded in float32), on the given calibration tokens (handed to its runner
in place of the dataset it would build), saved in OneComp's format, then read back by OneComp's
own loader; each quantized linear's dense weight is what its own forward computes on the
identity, written to OUT/dense.safetensors. Prints one JSON line: seconds, peak RSS.

    python run_onecomp14.py MODEL_DIR TOKENS.pt OUT --bits 4 --group-size 128 [--sym]
"""
import torch

import peer_cli


def dump_dense(out: str) -> None:
    from onecomp import load_quantized_model
    from safetensors.torch import save_file
    model, _ = load_quantized_model(out, torch_dtype=torch.float32, device_map="cpu")
    dense = {}
    with torch.no_grad():
        for name, mod in model.named_modules():
            if type(mod).__name__ != "GPTQLinear":
                continue
            eye = torch.eye(mod.in_features, dtype=torch.float32)
            y = mod(eye).float()                                   # (in, out) = I W^T (+ bias)
            if getattr(mod, "bias", None) is not None:
                y = y - mod.bias.float()[None, :]
            dense[f"{name}.weight"] = y.T.contiguous()
    if not dense:
        raise SystemExit("no GPTQLinear module in the saved model")
    save_file(dense, f"{out}/dense.safetensors")


def same_tokens(ids: torch.Tensor) -> None:
    """Every place OneComp builds its calibration set (the runner and both QEP paths import the
    loader's function by name) returns these ids instead, with the model's extra inputs added."""
    import onecomp.qep._quantize_with_qep as qep_general
    import onecomp.qep._quantize_with_qep_arch as qep_arch
    import onecomp.runner as runner_mod
    from onecomp.utils import add_model_specific_inputs

    def given(tokenizer=None, device="cpu", calibration_config=None, model=None, logger=None, **_):
        batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
        return add_model_specific_inputs(batch, model)
    for mod in (qep_general, qep_arch, runner_mod):
        mod.prepare_calibration_dataset = given


def main():
    a = peer_cli.args()
    from onecomp import GPTQ, CalibrationConfig, ModelConfig, Runner
    ids = torch.load(a.tokens)
    same_tokens(ids)

    def quantize():
        quantizer = GPTQ(wbits=a.bits, groupsize=a.group_size, sym=a.sym)
        # float32 weights: OneComp's default float16 runs ~100x slower on CPU, and onecomp's statistics are float32
        runner = Runner(model_config=ModelConfig(path=a.model, dtype="float32", device="cpu"), quantizer=quantizer,
                        qep=True, calibration_config=CalibrationConfig(max_length=ids.shape[1],
                                                                       num_calibration_samples=ids.shape[0]))
        runner.run()
        return runner
    peer_cli.measured("onecomp14", quantize, lambda r: r.save_quantized_model(a.out), dump_dense, a.out)


if __name__ == "__main__":
    main()
