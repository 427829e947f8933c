#!/usr/bin/env bash
# The main paths on SmolLM2-135M on one GPU (device auto picks CUDA), each with its wall time, peak
# GPU memory and quality, one JSON line each; meant for the device tool when a GPU is lent:
#   ./scripts/setup.sh && bench/gpu_smoke.sh            (about 5 minutes on one H200-class GPU)
# Quick protocol: 16 x 512 calibration tokens, 4,096 evaluation tokens.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export ONECOMP_PROGRESS=0
python - <<'PY'
import json, sys, time, tempfile
sys.path.insert(0, "bench")
import torch
from common import quantize_and_measure
if not torch.cuda.is_available():
    raise SystemExit("gpu_smoke: no CUDA device here")
common = ["--num-samples", "16", "--device", "auto"]
runs = {
    "gptq+qep 4b/g128": ["--bits", "4", "--group-size", "128", "--projector", "gptq", "--correction", "qep"],
    "autobit 3.0 bpw": ["--planner", "autobit", "--target-bpw", "3.0"],
    "dbf 1.5 bpw": ["--format", "dbf", "--projector", "dbf", "--target-bpw", "1.5", "--option", "dbf.iters=10"],
    "gptq 3b/g128 + globalptq": ["--bits", "3", "--group-size", "128", "--refiner", "globalptq",
                                 "--option", "globalptq.epochs=1"],
}
for name, flags in runs.items():
    t0 = time.time()
    r = quantize_and_measure("smollm2-135m", [*flags, *common], 4096)
    r.update({"run": name, "seconds_total": round(time.time() - t0, 1), "device": torch.cuda.get_device_name(0)})
    print(json.dumps(r), flush=True)
PY
