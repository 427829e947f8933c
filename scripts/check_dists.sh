#!/usr/bin/env bash
# Every distribution of this repository on its own, as a user installs it:
#   1. build a wheel of each (python -m build: an sdist, then the wheel from it, isolated);
#   2. a clean environment with only onecomp-core from its wheel: `onecomp plugins` lists the
#      core alone, RTN quantizes a tiny model, and asking for gptq names the distribution;
#   3. for each plugin: a clean environment with the core plus that plugin installed from the
#      wheels with only its declared dependencies; `onecomp plugins --strict` lists it with its
#      version, and its own tests (copied out of the repository, so nothing imports the source
#      tree) pass there.
# The third-party libraries (torch, transformers, ...) are installed once into the core's
# environment and shared with the plugin environments through a .pth file; onecomp packages are
# never shared. The work folder (about 2 GiB) is removed after a passing run; CHECK_DISTS_DIR
# names one to keep (and reuse); a failing run keeps it and prints the failing step's log.
# CHECK_DISTS_ONLY=a,b checks only those plugin folders (e.g. onecomp-plugin-qep). Prints one line
# per distribution; exits 1 on a failure. CHECK_DISTS_JOBS=N checks N plugins at once (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
WORK=${CHECK_DISTS_DIR:-$(mktemp -d -t onecomp-dists.XXXXXX)}
mkdir -p "$WORK"
STEP_LOG=$WORK/pip.log      # the log a failing step's message points at
on_exit() {
    local rc=$?
    if [ $rc != 0 ]; then
        [ -s "$STEP_LOG" ] && { echo "[check_dists] last lines of $STEP_LOG:"; grep -v "WARNING: Location" "$STEP_LOG" | tail -30; } >&2
        echo "[check_dists] FAILED (exit $rc); work folder kept: $WORK" >&2
    elif [ -z "${CHECK_DISTS_DIR:-}" ]; then
        rm -rf "$WORK"
    fi
}
trap on_exit EXIT
# the wheels, one core environment with torch and one environment per plugin at once
free_kib=$(df -Pk "$WORK" | awk 'NR==2 {print $4}')
if [ "${free_kib:-0}" -lt $((5 * 1024 * 1024 / 2)) ]; then
    echo "[check_dists] only $((free_kib / 1024)) MiB free under $WORK; it needs about 2.5 GiB: free some disk or set CHECK_DISTS_DIR to a folder on a larger disk" >&2
    exit 1
fi
WHEELS=$WORK/wheels
export ONECOMP_PROGRESS=0 TOKENIZERS_PARALLELISM=false
PLUGINS=(onecomp_plugins_gptq onecomp_plugins_dbf plugins/*/)
log() { printf '[check_dists] %s\n' "$*"; }
pipin() { local env=$1; shift; "$env/bin/pip" install -q --disable-pip-version-check "$@" 2>>"$WORK/pip.log"; }

# -- 1. wheels --------------------------------------------------------------------------------
STEP_LOG=$WORK/pip.log
[ -x "$WORK/build/bin/python" ] || "$PY" -m venv "$WORK/build"
pipin "$WORK/build" build
rm -rf "$WHEELS"
for d in . "${PLUGINS[@]}"; do
    # an sdist first, the wheel built from it: nothing is written into the source tree
    "$WORK/build/bin/python" -m build --outdir "$WHEELS" "$d" > "$WORK/build.log" 2>&1 \
        || { cat "$WORK/build.log"; log "FAILED to build $d"; exit 1; }
done
log "built $(ls "$WHEELS"/*.whl | wc -l) wheels: $(cd "$WHEELS" && ls *.whl | sed 's/-py3-none-any.whl//' | tr '\n' ' ')"

# -- 2. the core alone ----------------------------------------------------------------------------
STEP_LOG=$WORK/pip.log
BASE=$WORK/core
[ -x "$BASE/bin/python" ] || "$PY" -m venv "$BASE"
"$BASE/bin/python" -c "import torch" 2>/dev/null || pipin "$BASE" "${TORCH_SPEC:-torch==2.13.0}"
pipin "$BASE" "$WHEELS"/onecomp_core-*.whl pytest hypothesis
pipin "$BASE" --force-reinstall --no-deps "$WHEELS"/onecomp_core-*.whl         # this build, on a re-run too
STEP_LOG=$WORK/core-check.log
"$BASE/bin/python" - "$WORK/core-check" 2>"$WORK/core-check.log" <<'PY'
import json, os, subprocess, sys
from pathlib import Path
import onecomp_core
from onecomp_core.errors import OnecompError
from onecomp_core.testing import make_model
work = Path(sys.argv[1])
rows = json.loads(subprocess.run([sys.executable, "-m", "onecomp_core.cli", "plugins", "--json", "--strict"],
                                 check=True, capture_output=True, text=True).stdout)
assert [r["name"] for r in rows] == ["core"], rows
model = make_model("llama", work / "tiny")
rep = onecomp_core.quantize(model, work / "q", bits=4, group_size=32, num_samples=2, seq_len=32, overwrite=True)
assert rep["config"]["projector"] == "rtn" and rep["summary"]["bpw"] > 4
try:
    onecomp_core.quantize(model, work / "g", projector="gptq", num_samples=2, seq_len=32)
    raise SystemExit("gptq ran without its plugin")
except OnecompError as e:
    msg = str(e)
assert "pip install onecomp-plugins-gptq" in msg, msg
print(f"onecomp-core {onecomp_core.__version__} alone: rtn quantized at {rep['summary']['bpw']} bpw; gptq -> {msg}")
PY
log "core alone: ok"
SITE=$("$BASE/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")

# -- 3. one plugin at a time (CHECK_DISTS_JOBS at once, default 2, one BLAS thread each) -----------
check_plugin() {   # $1: the plugin folder; writes $WORK/result-NAME: "ok LINE" or "FAILED REASON"
    local d=${1%/} name dist wheel env envsite listed line
    name=$(basename "$d")
    dist=$(sed -n 's/^name = "\(.*\)"$/\1/p' "$d/pyproject.toml" | head -1)
    wheel=$(ls "$WHEELS"/"${dist//-/_}"-*.whl)
    env=$WORK/env-$name
    rm -rf "$env" "$WORK/tests-$name" "$WORK/result-$name"
    "$PY" -m venv "$env"
    envsite=$("$env/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    echo "$SITE" > "$envsite/_onecomp_core_env.pth"          # third-party libraries and the core, shared
    if ! pipin "$env" --find-links "$WHEELS" "$wheel" > "$WORK/install-$name.log" 2>&1; then
        echo "FAILED $dist (install): $(tail -3 "$WORK/install-$name.log" | tr '\n' ' ')" > "$WORK/result-$name"; return
    fi
    if ! listed=$("$env/bin/python" -m onecomp_core.cli plugins --strict); then
        echo "FAILED $dist (plugins): $listed" > "$WORK/result-$name"; return
    fi
    line=$(echo "$listed" | grep " $dist " || true)
    [ -n "$line" ] || { echo "FAILED $dist (not listed): $listed" > "$WORK/result-$name"; return; }
    cp -r "$d/tests" "$WORK/tests-$name"
    if (cd "$WORK/tests-$name" && OMP_NUM_THREADS=1 "$env/bin/python" -m pytest -q -p no:cacheprovider -m "not whole_suite" --rootdir . . \
            > "$WORK/pytest-$name.log" 2>&1); then
        echo "ok $(echo "$line" | awk '{print $2, $3}'): $(tail -1 "$WORK/pytest-$name.log")" > "$WORK/result-$name"
    else
        echo "FAILED $dist (tests): see $WORK/pytest-$name.log" > "$WORK/result-$name"
        tail -40 "$WORK/pytest-$name.log" >&2
    fi
}

names=()
for d in "${PLUGINS[@]}"; do
    name=$(basename "${d%/}")
    if [ -n "${CHECK_DISTS_ONLY:-}" ] && [[ ",$CHECK_DISTS_ONLY," != *",$name,"* ]]; then continue; fi
    while [ "$(jobs -rp | wc -l)" -ge "${CHECK_DISTS_JOBS:-2}" ]; do wait -n || true; done
    check_plugin "$d" &
    names+=("$name")
done
wait
failed=()
for name in "${names[@]}"; do
    result=$(cat "$WORK/result-$name" 2>/dev/null || echo "FAILED $name (no result)")
    if [[ $result == ok* ]]; then log "${result#ok }"; else log "$result"; failed+=("$name"); fi
done
if [ ${#failed[@]} -gt 0 ]; then
    log "FAILED: ${failed[*]} (logs in $WORK)"
    exit 1
fi
log "every distribution installs from its wheel alone and passes its tests$([ -n "${CHECK_DISTS_DIR:-}" ] && echo " (work folder: $WORK)")"
