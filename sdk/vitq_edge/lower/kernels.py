"""Finding and loading libvitq_kernels.so, the runtime library behind the `vitq::` ops.

The library registers its kernels into ExecuTorch's operator registry when it is loaded.
The Python runtime (`executorch.runtime`) links the wheel's libexecutorch.so, and our
library names the same soname, so loading it after the runtime puts the kernels in the
registry the runtime reads. Load it once per process: two copies of one kernel abort.
"""

from __future__ import annotations

import ctypes
import os
from functools import cache
from pathlib import Path

from vitq_edge.device.runner import build_hint, runtime_dir
from vitq_edge.errors import VitqError

LIBRARY = "libvitq_kernels.so"
# The kernels ABI the programs written by this package call (runtime/kernels reports its own).
KERNELS_VERSION = "0.1.0"


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
    return version


def program_custom_ops(pte: bytes) -> list[str]:
    """The `vitq::` operators a .pte calls (empty for stock programs or unreadable bytes)."""
    try:
        from executorch.exir._serialize._program import deserialize_pte_binary

        program = deserialize_pte_binary(pte).program
    except Exception:  # not a program: loading it reports that, with a better message
        return []
    names = {op.name for plan in program.execution_plan for op in plan.operators}
    return sorted(n for n in names if n.startswith("vitq::"))
