#!/usr/bin/env bash
# Set everything up, quantize the embedded default model (SmolLM2-135M) to 4-bit g128 with GPTQ
# calibrated on bundled Wikipedia text, and print full-precision vs quantized perplexity.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
OUT=${OUT:-out/smollm2-gptq-w4g128}
onecomp quantize smollm2-135m --bits 4 --group-size 128 --projector gptq \
    --calibration data/enwiki_calib.txt --out "$OUT" --overwrite
onecomp eval "$OUT" --text data/enwiki_eval.txt --ref smollm2-135m --json | tee "$OUT.eval.json"
python - "$OUT.eval.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"perplexity on enwiki_eval (first {r['tokens']} tokens): full precision {r['ppl_ref']:.2f}, "
      f"4-bit GPTQ {r['ppl']:.2f} (+{100 * (r['ppl'] / r['ppl_ref'] - 1):.1f}%), KL {r['kl']:.4f}")
PY
