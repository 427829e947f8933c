"""A onecomp checkpoint read by plain transformers (`AutoModelForCausalLM.from_pretrained`) against
onecomp's own loader: perplexity of both on the same enwiki_eval tokens, one JSON line. Default:
SmolLM2-135M at the default grid (4b/g128 asymmetric) with RTN, quantized into --out if missing.

    OMP_NUM_THREADS=2 python bench/transformers_check.py [--out DIR] [--tokens 4096]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("/tmp/onecomp-transformers-check"))
    ap.add_argument("--tokens", type=int, default=4096)
    a = ap.parse_args()
    import onecomp_core
    from onecomp_core.evaluate import evaluate, text_tokens
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if not (a.out / "report.json").is_file():
        onecomp_core.quantize("smollm2-135m", a.out, bits=4, group_size=128, projector="rtn")
    qc = json.loads((a.out / "config.json").read_text())["quantization_config"]
    tok = AutoTokenizer.from_pretrained(str(a.out))
    ids = text_tokens(tok, ROOT / "data" / "enwiki_eval.txt", a.tokens)
    ours = onecomp_core.load_quantized(a.out)
    mine = evaluate(ours, ids, seq_len=512, bos=tok.bos_token_id)
    del ours
    theirs = AutoModelForCausalLM.from_pretrained(a.out, dtype=torch.float32).eval()
    plain = evaluate(theirs, ids, seq_len=512, bos=tok.bos_token_id)
    import compressed_tensors
    import transformers
    print(json.dumps({"bench": "transformers_check", "checkpoint": str(a.out), "config_groups": len(qc["config_groups"]),
                      "dequantize": qc.get("dequantize", False), "tokens": mine["tokens"],
                      "ppl_onecomp": round(mine["ppl"], 4), "ppl_transformers": round(plain["ppl"], 4),
                      "relative_difference": plain["ppl"] / mine["ppl"] - 1,
                      "transformers": transformers.__version__, "compressed_tensors": compressed_tensors.__version__}))


if __name__ == "__main__":
    main()
