#!/usr/bin/env bash
# Build the vitq-runner bundles:
#
#   build/runtime/host/{bin,lib}      for this machine, against the .venv's executorch wheel
#                                     (lib/ includes libvitq_kernels.so, the vitq:: custom ops)
#   build/runtime/aarch64/{bin,lib}   cross-compiled for a 64-bit Raspberry Pi, against the
#                                     manylinux_2_28_aarch64 executorch wheel
#   build/runtime/pi-prefix/{rpi4,rpi5}  qemu -L prefixes that emulate the boards
#   build/runtime/host-asan/{bin,lib}  (targets asan, all) AddressSanitizer builds for the
#                                     tests, for this machine:
#     bin/vitq-runner                 the runner's own code sanitized, the ExecuTorch
#                                     libraries as shipped (copied into lib/, RUNPATH
#                                     $ORIGIN/../lib); run it directly (tests/test_fuzz.py)
#     lib/libvitq_kernels.so          the kernels, sanitized; the runner above loads it,
#                                     and the Python tests with
#                                     LD_PRELOAD="$(gcc -print-file-name=libasan.so)
#                                     $(gcc -print-file-name=libstdc++.so)"
#                                     ASAN_OPTIONS=detect_leaks=0 python ...
#                                     (libstdc++ too: python does not link it, and
#                                     ASan aborts on torch's first C++ throw when its
#                                     __cxa_throw interceptor found no libstdc++)
#   build/runtime/qemu-plugin/libinsn_count.so
#                                     qemu TCG plugin counting guest instructions per
#                                     inference (runtime/qemu_plugin/insn_count.c)
#   build/runtime/qemu-plugin/libhot_blocks.so
#                                     the same per translation block (hot_blocks.c,
#                                     for tools/insn_profile.py)
#
# Each bundle is movable: bin/vitq-runner finds the ExecuTorch libraries copied into
# ../lib (RUNPATH $ORIGIN/../lib). Copy build/runtime/aarch64 to a Pi as is.
#
# usage: tools/build_runtime.sh [host|aarch64|asan|plugin|all]      (default: all; all = host,
#        asan, aarch64 and plugin)
# env:   JOBS (default 2), CMAKE (default .venv/bin/cmake, installed there when missing),
#        PYTHON (default .venv/bin/python), EXECUTORCH_VERSION (default: the .venv's),
#        VITQ_RUNTIME_DIR (default build/runtime: where the bundles go; the SDK reads the same)
#
# Safe to re-run: installs apt packages and downloads the aarch64 wheel only when
# missing, and rebuilds incrementally. The plugin needs QEMU's qemu-plugin.h, which no
# Debian binary package ships: it is taken from the source package of the installed
# qemu-user (apt-get source --download-only; a deb-src entry is added when apt has none)
# into build/runtime/qemu-plugin/include/, never into the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

TARGET=${1:-all}
case "$TARGET" in
    host|aarch64|asan|plugin|all) ;;
    -h|--help) sed -n '2,/^set -euo/{/^#/p}' "$0"; exit 0 ;;  # the header comment
    *) echo "build_runtime: unknown target '$TARGET' (host, aarch64, asan, plugin or all)" >&2; exit 2 ;;
esac

JOBS=${JOBS:-2}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
OUT=${VITQ_RUNTIME_DIR:-$ROOT/build/runtime}
WHEEL_DIR=$OUT/aarch64-wheel
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

log() { echo "build_runtime: $*"; }
die() { echo "build_runtime: error: $*" >&2; exit 1; }


apt_install() {
    local missing=()
    for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get to install them"
    log "installing apt packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
}

# CMake >= 3.28 (the executorch package's targets and our $ORIGIN RPATH need it;
# Debian 12 ships 3.25).
cmake_ok() { "$1" --version 2>/dev/null | awk 'NR==1 { split($3, v, "."); exit !(v[1] > 3 || (v[1] == 3 && v[2] >= 28)) }'; }
find_cmake() {
    if [ -n "${CMAKE:-}" ]; then
        cmake_ok "$CMAKE" || die "CMAKE=$CMAKE is older than 3.28"
        return
    fi
    CMAKE=$ROOT/.venv/bin/cmake
    if ! cmake_ok "$CMAKE"; then
        if command -v cmake >/dev/null && cmake_ok "$(command -v cmake)"; then
            CMAKE=$(command -v cmake)
            return
        fi
        log "installing cmake >= 3.28 into .venv (pip)"
        "$PYTHON" -m pip install -q "cmake>=3.28"
        cmake_ok "$CMAKE" || die "could not get cmake >= 3.28"
    fi
}

# Configure, build and install one bundle. $1 = host|aarch64, rest = extra cmake args.
build_bundle() {
    local name=$1; shift
    local bdir=$OUT/_build/$name prefix=$OUT/$name
    log "[$name] configuring ($bdir)"
    "$CMAKE" -S runtime -B "$bdir" -DCMAKE_BUILD_TYPE=Release "$@" >"$bdir.configure.log" 2>&1 \
        || { cat "$bdir.configure.log" >&2; die "[$name] cmake configure failed"; }
    log "[$name] building (-j$JOBS)"
    nice -n 19 "$CMAKE" --build "$bdir" -j "$JOBS"
    # A fresh install, so a library dropped from the link does not linger in lib/.
    rm -rf "$prefix"
    "$CMAKE" --install "$bdir" --prefix "$prefix" >/dev/null
    log "[$name] bundle ready: $prefix/bin/vitq-runner"
}

# The custom-op library must be in the bundle (unless built with -DVITQ_BUILD_KERNELS=OFF).
check_kernels() {
    local lib=$OUT/$1/lib/libvitq_kernels.so
    [ -f runtime/kernels/CMakeLists.txt ] || return 0
    [ -f "$lib" ] || die "[$1] $lib is missing from the bundle"
    log "[$1] kernels: $lib"
}

# --- qemu instruction-count plugin ----------------------------------------------------
# QEMU's plugin API header (include/qemu/qemu-plugin.h) is in no Debian binary package.
# Take it from the source package of the installed qemu-user, so the declared plugin API
# version matches the qemu-aarch64 that loads the plugin.
PLUGIN_DIR=$OUT/qemu-plugin
PLUGIN_INC=$PLUGIN_DIR/include

# Add deb-src entries mirroring the configured Debian sources (apt-get source needs them).
enable_deb_src() {
    local f
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then      # Debian 12 default (deb822)
        f=/etc/apt/sources.list.d/vitq-edge-deb-src.sources
        log "apt has no source entry for qemu: adding $f (deb-src of debian.sources)"
        sed -E 's/^Types:.*$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources | $SUDO tee "$f" >/dev/null
    elif grep -Eqs '^deb[[:space:]]' /etc/apt/sources.list; then  # one-line format
        f=/etc/apt/sources.list.d/vitq-edge-deb-src.list
        log "apt has no source entry for qemu: adding $f (deb-src of sources.list)"
        grep -E '^deb[[:space:]]' /etc/apt/sources.list | sed -E 's/^deb/deb-src/' | $SUDO tee "$f" >/dev/null
    else
        die "no Debian apt source to derive a deb-src entry from; add a deb-src line for qemu's suite and re-run"
    fi
    $SUDO apt-get update -qq
}

# Fetch qemu-plugin.h of qemu source version $1 into $PLUGIN_INC.
fetch_qemu_plugin_header() {
    local ver=$1 tmp orig hdr
    command -v apt-get >/dev/null || die "no apt-get: put QEMU $ver's include/qemu/qemu-plugin.h into $PLUGIN_INC/ yourself"
    command -v xz >/dev/null || apt_install xz-utils
    apt-cache showsrc qemu 2>/dev/null | grep -q '^Package: qemu$' || enable_deb_src
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT   # also on a failure below
    log "[plugin] downloading the qemu $ver source package for qemu-plugin.h (~24 MB, only the header is kept)"
    # --download-only: nothing is unpacked or built; runs fine without root.
    if ! (cd "$tmp" && apt-get source --download-only "qemu=$ver") >"$tmp/apt.log" 2>&1; then
        log "[plugin] qemu $ver source is not in apt's lists; taking the current qemu source"
        rm -f "$tmp"/qemu_*
        (cd "$tmp" && apt-get source --download-only qemu) >"$tmp/apt.log" 2>&1 \
            || { cat "$tmp/apt.log" >&2; die "[plugin] apt-get source qemu failed"; }
    fi
    orig=$(ls "$tmp"/qemu_*.orig.tar.* 2>/dev/null | head -1)
    [ -n "$orig" ] || die "[plugin] no qemu orig tarball downloaded"
    tar -xf "$orig" -C "$tmp" --wildcards '*/include/qemu/qemu-plugin.h'
    hdr=$(ls "$tmp"/*/include/qemu/qemu-plugin.h 2>/dev/null | head -1)
    [ -n "$hdr" ] || die "[plugin] $orig holds no include/qemu/qemu-plugin.h"
    # Debian's patches are not applied; say so if one of them touches the header.
    local deb
    deb=$(ls "$tmp"/qemu_*.debian.tar.* 2>/dev/null | head -1)
    if [ -n "$deb" ] && [ "$(tar -xOf "$deb" --wildcards 'debian/patches/*' 2>/dev/null \
            | grep -c '^+++ .*include/qemu/qemu-plugin\.h' || true)" != 0 ]; then
        log "[plugin] warning: a Debian patch of qemu $ver modifies qemu-plugin.h; using the upstream header"
    fi
    mkdir -p "$PLUGIN_INC"
    cp "$hdr" "$PLUGIN_INC/qemu-plugin.h"
    echo "$ver" > "$PLUGIN_INC/.qemu-source-version"
    rm -rf "$tmp"
    trap - EXIT
}

build_plugin() {
    apt_install qemu-user gcc gcc-aarch64-linux-gnu
    local qver api src=runtime/qemu_plugin/insn_count.c lib=$PLUGIN_DIR/libinsn_count.so
    qver=$(dpkg-query -W -f='${source:Version}' qemu-user)
    if [ ! -f "$PLUGIN_INC/qemu-plugin.h" ] || [ "$(cat "$PLUGIN_INC/.qemu-source-version" 2>/dev/null)" != "$qver" ]; then
        fetch_qemu_plugin_header "$qver"
    fi
    api=$(sed -nE 's/^#define QEMU_PLUGIN_VERSION[[:space:]]+([0-9]+).*/\1/p' "$PLUGIN_INC/qemu-plugin.h")
    log "[plugin] qemu-plugin.h of qemu $(cat "$PLUGIN_INC/.qemu-source-version"): plugin API version ${api:-?}"
    local cflags=()
    # QEMU >= 8 headers include <glib.h>; 7.2's does not.
    if grep -q '#include <glib.h>' "$PLUGIN_INC/qemu-plugin.h"; then
        apt_install libglib2.0-dev pkg-config
        read -r -a cflags <<<"$(pkg-config --cflags glib-2.0)"
    fi
    local name
    for name in insn_count hot_blocks; do  # hot_blocks: tools/insn_profile.py's per-block counts
        src=runtime/qemu_plugin/$name.c lib=$PLUGIN_DIR/lib$name.so
        if [ ! -f "$lib" ] || [ "$src" -nt "$lib" ] || [ "$PLUGIN_INC/qemu-plugin.h" -nt "$lib" ]; then
            log "[plugin] building $lib"
            gcc -O2 -Wall -Wextra -shared -fPIC -I"$PLUGIN_INC" "${cflags[@]}" "$src" -o "$lib.tmp"
            mv "$lib.tmp" "$lib"
        fi
    done
    lib=$PLUGIN_DIR/libinsn_count.so
    # Self-test: a static guest with a known number of instructions between markers.
    local t=$PLUGIN_DIR/selftest gran got want='[3004, 6004]'
    if [ ! -f "$t" ] || [ runtime/qemu_plugin/selftest.S -nt "$t" ]; then
        aarch64-linux-gnu-gcc -nostdlib -static runtime/qemu_plugin/selftest.S -o "$t"
    fi
    # The inline counter per block and per instruction, and the schedule mode's per-thread
    # counts (spans are their sum; the self-test declares no thread pool).
    for mode in granularity=tb granularity=insn threads=2; do
        rm -f "$t.json"
        qemu-aarch64 -plugin "$lib,out=$t.json,$mode" "$t" \
            || die "[plugin] qemu-aarch64 could not run the self-test with the plugin (a qemu-aarch64-static cannot load plugins)"
        got=$(sed -nE 's/.*"markers": \[[^]]*\], "spans": (\[[^]]*\]).*/\1/p' "$t.json")
        [ "$got" = "$want" ] || die "[plugin] self-test ($mode): spans $got, expected $want"
    done
    # hot_blocks: the blocks' instructions in the spans add up to the spans' total.
    rm -f "$t.blocks"
    qemu-aarch64 -plugin "$PLUGIN_DIR/libhot_blocks.so,out=$t.blocks" "$t" \
        || die "[plugin] qemu-aarch64 could not run the self-test with the hot_blocks plugin"
    got=$(awk '!/^#/ { s += $2 * $3 } END { print s }' "$t.blocks")
    [ "$got" = 9008 ] || die "[plugin] hot_blocks self-test: $got instructions in the spans, expected 9008"
    log "[plugin] ready (self-test passed): qemu-aarch64 -plugin $lib,out=COUNTS.json ..."
}

if [ "$TARGET" = plugin ]; then
    build_plugin
    log "done"
    exit 0
fi

[ -x "$PYTHON" ] || die "$PYTHON not found; run tools/setup.sh first (or set PYTHON)"

mkdir -p "$OUT/_build"
find_cmake
log "using $CMAKE ($("$CMAKE" --version | head -1))"

# executorch is a namespace package (no __init__.py): take the search path
# entry that holds the C++ package.
ET_PKG_HOST=$("$PYTHON" - <<'EOF'
import importlib.util, os
spec = importlib.util.find_spec("executorch")
for d in (spec.submodule_search_locations or []) if spec else []:
    if os.path.exists(os.path.join(d, "share", "cmake", "executorch-config.cmake")):
        print(d)
        break
EOF
)
[ -n "$ET_PKG_HOST" ] || die "no executorch package with a C++ runtime in $PYTHON's environment"
ET_VERSION=${EXECUTORCH_VERSION:-$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("executorch"))')}

if [ "$TARGET" = host ] || [ "$TARGET" = all ]; then
    command -v g++ >/dev/null || apt_install g++
    build_bundle host -DEXECUTORCH_PACKAGE_DIR="$ET_PKG_HOST"
    "$OUT/host/bin/vitq-runner" --version >/dev/null || die "[host] the bundle does not start"
    check_kernels host
fi

if [ "$TARGET" = asan ] || [ "$TARGET" = all ]; then
    # The runner and the kernels with AddressSanitizer, from one build tree.
    command -v g++ >/dev/null || apt_install g++
    bdir=$OUT/_build/host-asan
    prefix=$OUT/host-asan
    log "[asan] configuring ($bdir)"
    "$CMAKE" -S runtime -B "$bdir" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
        -DVITQ_KERNELS_ASAN=ON -DVITQ_RUNNER_ASAN=ON \
        -DEXECUTORCH_PACKAGE_DIR="$ET_PKG_HOST" >"$bdir.configure.log" 2>&1 \
        || { cat "$bdir.configure.log" >&2; die "[asan] cmake configure failed"; }
    log "[asan] building vitq-runner and libvitq_kernels.so (-j$JOBS)"
    nice -n 19 "$CMAKE" --build "$bdir" -j "$JOBS"
    # The runner as installed (RUNPATH $ORIGIN/../lib, with copies of the ExecuTorch
    # libraries), so bin/vitq-runner runs directly, as the host bundle's does. The
    # kernels are the build-tree copy instead, as before the runner was added: its
    # RUNPATH is the .venv wheel's lib/ (CMake's build RPATH), so Python tests can
    # load it on its own; in the runner its libraries are already loaded from lib/.
    stage=$bdir/_install
    rm -rf "$stage" "$prefix.tmp"
    "$CMAKE" --install "$bdir" --prefix "$stage" >/dev/null
    mkdir -p "$prefix.tmp/bin"
    cp "$stage/bin/vitq-runner" "$prefix.tmp/bin/"
    cp -r "$stage/lib" "$prefix.tmp/lib"
    cp "$bdir/kernels/libvitq_kernels.so" "$prefix.tmp/lib/libvitq_kernels.so"
    rm -rf "$prefix" "$stage"
    mv "$prefix.tmp" "$prefix"
    # Leak checking stays on: the runner exits clean of leaks, on errors too.
    "$prefix/bin/vitq-runner" --version >/dev/null || die "[asan] $prefix/bin/vitq-runner does not start"
    log "[asan] ready: $prefix/bin/vitq-runner"
    log "[asan] ready: $prefix/lib/libvitq_kernels.so (run Python with" \
        "LD_PRELOAD=\"\$(gcc -print-file-name=libasan.so) \$(gcc -print-file-name=libstdc++.so)\"" \
        "ASAN_OPTIONS=detect_leaks=0)"
fi

if [ "$TARGET" = aarch64 ] || [ "$TARGET" = all ]; then
    apt_install g++-aarch64-linux-gnu qemu-user

    # The aarch64 executorch wheel: same include/lib/share layout, aarch64 libraries.
    ET_PKG_ARM=$WHEEL_DIR/executorch
    stamp=$WHEEL_DIR/.version
    if [ ! -f "$ET_PKG_ARM/share/cmake/executorch-config.cmake" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$ET_VERSION" ]; then
        log "downloading the executorch $ET_VERSION manylinux_2_28_aarch64 wheel"
        rm -rf "$WHEEL_DIR"
        mkdir -p "$WHEEL_DIR/dl"
        "$PYTHON" -m pip download -q --no-deps --only-binary=:all: \
            --platform manylinux_2_28_aarch64 --python-version 3.11 \
            "executorch==$ET_VERSION" -d "$WHEEL_DIR/dl"
        whl=$(ls "$WHEEL_DIR"/dl/executorch-*.whl | head -1)
        [ -n "$whl" ] || die "pip did not download an executorch wheel"
        # Only what a C++ build needs (headers, libraries, CMake package).
        "$PYTHON" - "$whl" "$WHEEL_DIR" <<'EOF'
import sys, zipfile
whl, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    names = [n for n in z.namelist()
             if n.startswith(("executorch/include/", "executorch/lib/", "executorch/share/"))]
    z.extractall(dest, names)
EOF
        rm -rf "$WHEEL_DIR/dl"
        echo "$ET_VERSION" > "$stamp"
    fi

    build_bundle aarch64 \
        -DCMAKE_TOOLCHAIN_FILE="$ROOT/runtime/cmake/aarch64-linux-gnu.toolchain.cmake" \
        -DEXECUTORCH_PACKAGE_DIR="$ET_PKG_ARM"

    python3 tools/make_pi_prefix.py --out "$OUT/pi-prefix" >/dev/null
    log "[aarch64] Pi prefixes: $OUT/pi-prefix/{rpi4,rpi5}"
    qemu-aarch64 -cpu cortex-a72 -L "$OUT/pi-prefix/rpi4" "$OUT/aarch64/bin/vitq-runner" --version >/dev/null \
        || die "[aarch64] the bundle does not start under qemu-aarch64"
    check_kernels aarch64
    log "[aarch64] run it with: qemu-aarch64 -cpu cortex-a72 -L $OUT/pi-prefix/rpi4 $OUT/aarch64/bin/vitq-runner MODEL.pte ..."
fi

if [ "$TARGET" = all ]; then
    build_plugin
fi
log "done"
