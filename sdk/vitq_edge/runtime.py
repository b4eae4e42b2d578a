"""The C++ runtime (runtime/) as this package finds it: the runner bundles and the kernels library.

Where `tools/build_runtime.sh` puts the bundles, which machine a binary is built for, and
loading libvitq_kernels.so into this process. A leaf, so that lowering (`lower/`) and the
devices (`device/`) both use it without importing each other.

The kernels library registers its kernels into ExecuTorch's operator registry when it is
loaded. The Python runtime (`executorch.runtime`) links the wheel's libexecutorch.so, and
our library names the same soname, so loading it after the runtime puts the kernels in
the registry the runtime reads. Load it once per process: two copies of one kernel abort.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from vitq_edge import __version__
from vitq_edge.errors import VitqError
from vitq_edge.pte import read_program

RUNNER = "vitq-runner"

# The repository this package was installed from (editable installs): where
# tools/build_runtime.sh writes build/runtime/.
REPO = Path(__file__).resolve().parents[2]

_ELF_MACHINES = {3: "x86", 40: "arm", 62: "x86-64", 183: "aarch64", 243: "riscv"}
_HOST_MACHINES = {"x86_64": "x86-64", "amd64": "x86-64", "aarch64": "aarch64", "arm64": "aarch64"}


def runtime_dir() -> Path:
    """Where the runner bundles live: $VITQ_RUNTIME_DIR, else <repo>/build/runtime."""
    env = os.environ.get("VITQ_RUNTIME_DIR")
    return Path(env).expanduser() if env else REPO / "build" / "runtime"


def build_hint(what: str = "") -> str:
    """The command that builds the runtime bundles (or where to point instead)."""
    script = REPO / "tools" / "build_runtime.sh"
    if script.is_file():
        return f"build it with `bash {shown_path(script)}{' ' + what if what else ''}` (a few minutes)"
    return ("build the bundles with tools/build_runtime.sh from the vitq-edge repository and set "
            "VITQ_RUNTIME_DIR to its build/runtime folder")


def shown_path(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when inside it."""
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    return str(path)


def elf_machine(path: Path) -> str | None:
    """The CPU architecture an ELF file is built for ('x86-64', 'aarch64', ...); None if not ELF."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return None
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    machine = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    return _ELF_MACHINES.get(machine, f"machine {machine}")


def host_machine() -> str:
    return _HOST_MACHINES.get(platform.machine().lower(), platform.machine())


@dataclass(frozen=True)
class Bundle:
    """A movable runner bundle: bin/vitq-runner + lib/*.so, built for one architecture."""

    name: str  # "host" or "aarch64": the folder under runtime_dir()
    root: Path
    machine: str  # the ELF architecture its runner must have

    @property
    def runner(self) -> Path:
        return self.root / "bin" / RUNNER

    @property
    def lib(self) -> Path:
        return self.root / "lib"


def find_bundle(name: str) -> Bundle:
    """The `host` or `aarch64` bundle, checked to exist and to be built for its architecture."""
    machine = host_machine() if name == "host" else name
    bundle = Bundle(name, runtime_dir() / name, machine)
    if not bundle.runner.is_file() or not bundle.lib.is_dir():
        raise VitqError(f"the {name} runner bundle is missing ({shown_path(bundle.runner)}); {build_hint(name)}, "
                        "or set VITQ_RUNTIME_DIR to a folder holding it")
    actual = elf_machine(bundle.runner)
    if actual != machine:
        built_for = actual or "no known architecture (not an ELF file)"
        raise VitqError(f"{shown_path(bundle.runner)} is built for {built_for}, not {machine}; "
                        f"rebuild the {name} bundle: {build_hint(name)}")
    return bundle


LIBRARY = "libvitq_kernels.so"
# The library must be built from this version's runtime/ (CMake reads the same string).
KERNELS_VERSION = __version__
# The version of the integer arithmetic (quant/arith.py and the kernels that mirror it): which
# bits a quantized program computes. A build records it, and a program built for another one is
# refused where it is run (artifacts.check_arithmetic): it would run, but compute other bits than
# its build measured. Raise it with any change to what a program computes. CMake reads this line.
#   1: GELU and the softmax exponentials in float, LayerNorm in double
#   2: GELU by a table of codes, the integer softmax, LayerNorm in float32 (2026-12-05)
ARITHMETIC_VERSION = 2
# What a quantized build's manifest (or a compare row) without the field was made with.
UNRECORDED_ARITHMETIC = 1


def kernels_path() -> Path:
    """$VITQ_KERNELS, else the host bundle's copy (tools/build_runtime.sh host)."""
    env = os.environ.get("VITQ_KERNELS")
    return Path(env).expanduser() if env else runtime_dir() / "host" / "lib" / LIBRARY


@cache
def load_kernels() -> str:
    """Load the kernels into this process (once); returns the library's version."""
    from executorch.runtime import Runtime

    Runtime.get()  # libexecutorch.so first, so the kernels register into its registry
    path = kernels_path()
    if not path.is_file():
        raise VitqError(f"this program uses vitq:: custom ops, whose kernels ({path}) are not built; "
                        f"{build_hint('host')}")
    try:
        lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        raise VitqError(f"cannot load {path} ({exc}); rebuild it: {build_hint('host')}") from None
    lib.vitq_kernels_version.restype = ctypes.c_char_p
    version = lib.vitq_kernels_version().decode()
    if version != KERNELS_VERSION:
        raise VitqError(f"{path} is version {version}, this vitq-edge needs {KERNELS_VERSION}; "
                        f"rebuild it: {build_hint('host')}")
    arithmetic = lib.vitq_arithmetic_version()
    if arithmetic != ARITHMETIC_VERSION:
        raise VitqError(f"{path} computes integer arithmetic {arithmetic}, this vitq-edge {ARITHMETIC_VERSION}; "
                        f"rebuild it: {build_hint('host')}")
    return version


def program_custom_ops(pte: bytes) -> list[str]:
    """The `vitq::` operators a .pte calls (empty for stock programs or unreadable bytes)."""
    program = read_program(pte)
    if program is None:  # not a program: loading it reports that, with a better message
        return []
    names = {op.name for plan in program.execution_plan for op in plan.operators}
    return sorted(n for n in names if n.startswith("vitq::"))
