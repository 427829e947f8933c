#!/usr/bin/env bash
# One virtual environment per peer under ${PEERS:-~/.cache/onecomp/peers}, CPU torch, pinned versions.
#   bench/peers/setup.sh [llmcompressor] [gptqmodel] [onecomp14]
set -euo pipefail
PEERS=${PEERS:-$HOME/.cache/onecomp/peers}
TORCH=${TORCH_SPEC:-torch==2.13.0}
declare -A SPEC=([llmcompressor]="llmcompressor==0.14.0.1" [gptqmodel]="gptqmodel==7.6.0" [onecomp14]="onecomp==1.4.0")
for tool in "${@:-llmcompressor}"; do
    env="$PEERS/$tool"
    [ -x "$env/bin/python" ] || python3 -m venv "$env"
    "$env/bin/pip" install -q "$TORCH"
    BUILD_CUDA_EXT=0 "$env/bin/pip" install -q "${SPEC[$tool]}"
    echo "$tool: $("$env/bin/pip" show "${SPEC[$tool]%%==*}" | grep ^Version)"
done
