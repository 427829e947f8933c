#!/usr/bin/env bash
# One virtual environment per peer under ${PEERS:-~/.cache/onecomp/peers}, CPU torch, pinned versions.
#   bench/peers/setup.sh [llmcompressor] [gptqmodel] [onecomp14]
set -euo pipefail
PEERS=${PEERS:-$HOME/.cache/onecomp/peers}
TORCH=${TORCH_SPEC:-torch==2.13.0}
declare -A SPEC=([llmcompressor]="llmcompressor==0.14.0.1" [gptqmodel]="gptqmodel==7.6.0" [onecomp14]="onecomp==1.4.0")
# OneComp 1.4 needs Python >= 3.12: the first python3.12/3.13 on PATH or under pyenv
py312() {
    for p in python3.12 python3.13 "$HOME"/.pyenv/versions/3.12*/bin/python "$HOME"/.pyenv/versions/3.13*/bin/python; do
        # run it, not just find it: a pyenv shim exists for versions that are not selected
        "$p" -c "import sys; assert sys.version_info >= (3, 12)" > /dev/null 2>&1 && { echo "$p"; return; }
    done
    echo "onecomp14 needs Python 3.12 or 3.13 (OneComp 1.4 requires it); none found" >&2; exit 1
}
for tool in "${@:-llmcompressor}"; do
    env="$PEERS/$tool"
    py=python3
    [ "$tool" = onecomp14 ] && py=$(py312)
    [ -x "$env/bin/python" ] || "$py" -m venv "$env"
    "$env/bin/pip" install -q "$TORCH"
    BUILD_CUDA_EXT=0 "$env/bin/pip" install -q "${SPEC[$tool]}"
    echo "$tool: $("$env/bin/pip" show "${SPEC[$tool]%%==*}" | grep ^Version)"
done
