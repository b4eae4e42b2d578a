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
    .venv/bin/python -m pip install -q "${index_args[@]}" "torch==2.13.0" -e ".[dev,real]"
    echo "$want" > "$stamp"
fi
# The device layer (`vitq-edge eval|bench --device ...`) and its tests: the aarch64 cross
# compiler and qemu-user for the emulated Raspberry Pis, glib headers and xz for the qemu
# instruction-count plugin, ssh/scp for real boards, and sshd for the loopback SSH test
# (which starts its own sshd on 127.0.0.1; the package's system service is held back here
# with Debian's policy-rc.d switch while installing, so no sshd starts on port 22).
device_pkgs=(qemu-user g++-aarch64-linux-gnu libglib2.0-dev pkg-config xz-utils openssh-client openssh-server)
if ! dpkg -s "${device_pkgs[@]}" >/dev/null 2>&1; then
    policy=/usr/sbin/policy-rc.d made_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
        $SUDO chmod 755 "$policy"
        made_policy=1
        trap '$SUDO rm -f "$policy"' EXIT
    fi
    apt_install "${device_pkgs[@]}"
    if [ $made_policy = 1 ]; then
        $SUDO rm -f "$policy"
        trap - EXIT
    fi
fi

# The vitq-runner bundles (host, aarch64), the qemu Pi prefixes and the qemu plugin.
# tools/build_runtime.sh is incremental, but even a no-op run configures CMake twice:
# skip it when its outputs exist and nothing they are made from changed since.
stamp_rt=build/runtime/.setup-stamp
outputs=(build/runtime/host/bin/vitq-runner build/runtime/aarch64/bin/vitq-runner
         build/runtime/pi-prefix/rpi4/proc/cpuinfo build/runtime/pi-prefix/rpi5/proc/cpuinfo
         build/runtime/qemu-plugin/libinsn_count.so build/runtime/qemu-plugin/libhot_blocks.so)
rt_fresh=1
for f in "${outputs[@]}" "$stamp_rt"; do [ -e "$f" ] || rt_fresh=0; done
if [ $rt_fresh = 1 ] && [ -n "$(find runtime tools/build_runtime.sh tools/make_pi_prefix.py pyproject.toml \
        -newer "$stamp_rt" -print -quit)" ]; then
    rt_fresh=0
fi
if [ $rt_fresh = 0 ]; then
    echo "setup: building the runner bundles (tools/build_runtime.sh; first time: a few minutes)"
    bash tools/build_runtime.sh
    touch "$stamp_rt"
fi
echo "setup: ready (.venv/bin/vitq-edge)"
