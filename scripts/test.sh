#!/usr/bin/env bash
# Set everything up and run the whole test suite (core, plugins, real-model checks).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
export ONECOMP_PROGRESS=0
python -m pytest -q "$@"
