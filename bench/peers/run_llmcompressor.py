"""Runs inside the LLM Compressor venv: GPTQ on the given calibration tokens, saved as LLM
Compressor saves it (compressed-tensors). Prints one JSON line: seconds, peak RSS.

    python run_llmcompressor.py MODEL_DIR TOKENS.pt OUT --bits 4 --group-size 128 --sym|--asym
"""
import torch

import peer_cli


def main():
    a = peer_cli.args()
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM
    ids = torch.load(a.tokens)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    strategy = "channel" if a.group_size == -1 else "group"
    weights = QuantizationArgs(num_bits=a.bits, type="int", symmetric=a.sym, strategy=strategy,
                               group_size=None if a.group_size == -1 else a.group_size)
    recipe = GPTQModifier(config_groups={"g": QuantizationScheme(targets=["Linear"], weights=weights)},
                          ignore=["lm_head"])

    def quantize():
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
        oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=ids.shape[1],
                num_calibration_samples=ids.shape[0])
        return model
    peer_cli.measured("llmcompressor", quantize, lambda model: model.save_pretrained(a.out, save_compressed=True),
                      dump_dense, a.out)


def dump_dense(out: str) -> None:
    """The saved checkpoint loaded back by the tool's own loader (transformers + compressed-tensors,
    decompressed): every Linear's dense weight into OUT/dense.safetensors for the harness."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig
    m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                             quantization_config=CompressedTensorsConfig(run_compressed=False))
    dense = {f"{n}.weight": mod.weight.detach().float().contiguous() for n, mod in m.named_modules()
             if isinstance(mod, torch.nn.Linear) and n != "lm_head"}
    save_file(dense, f"{out}/dense.safetensors")


if __name__ == "__main__":
    main()
