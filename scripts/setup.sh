#!/usr/bin/env bash
# Set up cnnlab in ./.venv: torch 2.14.1 with torchvision 0.29.1, then cnnlab itself.
#   bash scripts/setup.sh           # to train, predict, export, serve
#   bash scripts/setup.sh --test    # also the test tools: pytest, Chromium, PostgreSQL
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
fi
# torch and torchvision first, pinned as a pair that imports together. What pip gets depends on
# the machine (README, "What set-up installs"): on a Linux PC, PyPI serves the multi-GB CUDA
# build (here it lies on disk), unless CNNLAB_TORCH_INDEX names PyTorch's CPU wheel index; on a
# Mac, the Apple-GPU build.
torch_from=()
[[ -n "${CNNLAB_TORCH_INDEX:-}" ]] && torch_from=(--index-url "$CNNLAB_TORCH_INDEX")
.venv/bin/python -m pip install -q --disable-pip-version-check ${torch_from[@]+"${torch_from[@]}"} torch==2.14.1 torchvision==0.29.1
if [[ $want_test == 1 ]]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[all,test]'
else
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[all]'
fi

if [[ $want_test == 1 ]]; then
    # System packages the tests drive for real: a headless browser and a database server.
    need=()
    command -v chromium >/dev/null 2>&1 || need+=(chromium)
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
    if (( ${#need[@]} )); then
        if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
            apt-get update -qq >/dev/null
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
        else
            echo "setup: install ${need[*]} (Debian packages) for the browser and database tests" >&2
        fi
    fi
fi
echo "setup: ready (.venv)"
