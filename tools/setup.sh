#!/usr/bin/env bash
# Install everything vitq-edge needs on Debian 12 with Python 3.11: the few apt
# packages, then a virtual environment in .venv with the package (editable) and
# its test tools. Safe to run again: it skips what is already in place.
#
# torch is pinned to 2.13.0 (the version ExecuTorch 1.5.1 is built against). Where
# pip would otherwise fetch a CUDA build, set VITQ_TORCH_INDEX to a CPU wheel index.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

apt_install() {
    local missing=()
    for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "setup: installing apt packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
}

# Debian's python3 needs python3-venv for `python -m venv` (a pyenv Python has it).
if ! "$PYTHON" -c "import ensurepip, venv" >/dev/null 2>&1; then
    apt_install python3-venv
fi
# A C/C++ toolchain for packages that build extensions (and the runtime/ kernels).
command -v g++ >/dev/null 2>&1 || apt_install g++

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PYTHON" -m venv .venv
fi

stamp=.venv/.vitq-edge-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing Python packages into .venv (first time: a few minutes)"
    index_args=()
    [ -n "${VITQ_TORCH_INDEX:-}" ] && index_args=(--extra-index-url "$VITQ_TORCH_INDEX")
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q "${index_args[@]}" "torch==2.13.0" -e ".[dev]"
    echo "$want" > "$stamp"
fi
echo "setup: ready (.venv/bin/vitq-edge)"
