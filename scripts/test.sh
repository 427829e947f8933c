#!/usr/bin/env bash
# Set everything up and run the whole test suite: the core, every plugin and the real-model
# checks in one environment, then every distribution alone, installed from its wheel
# (scripts/check_dists.sh). Arguments go to pytest; CHECK_DISTS=0 skips the second part.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
export ONECOMP_PROGRESS=0
# two test processes (pytest-xdist) on one BLAS thread each: the suite is many small runs
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python -m pytest -q -n "${PYTEST_WORKERS:-2}" "$@"
if [ "${CHECK_DISTS:-1}" != 0 ]; then
    ./scripts/check_dists.sh
fi
