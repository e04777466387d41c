#!/usr/bin/env bash
# Set up cnnlab in ./.venv: the CPU build of torch 2.13.0, then cnnlab itself.
#   bash scripts/setup.sh           # to train, predict, export, serve
#   bash scripts/setup.sh --test    # also the test tools: pytest, Chromium, PostgreSQL
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
fi
# torch first and pinned: asked for plainly, pip would fetch a multi-GB CUDA build.
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
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
