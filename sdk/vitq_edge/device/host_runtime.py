"""Run a .pte in ExecuTorch's Python runtime on this machine."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import torch
from executorch.runtime import Runtime

from vitq_edge.errors import VitqError
from vitq_edge.held_stderr import held_stderr
from vitq_edge.runtime import load_kernels, program_custom_ops

# ExecuTorch's thread pool reports its CPU probing ("[cpuinfo_utils.cpp:71] Reading file ...")
# the first time a method loads on x86, and the runtime logs a failed load or run before
# raising: nothing a user can act on, or said again by our error line.
_NATIVE_CHATTER = re.compile(r"^\[cpuinfo_utils\.cpp:\d+\] ")


def _runtime_logs_filtered() -> contextlib.AbstractContextManager[None]:
    return held_stderr(keep=lambda line: not _NATIVE_CHATTER.match(line))


def _physical_memory() -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def _read_program(path: Path) -> bytes:
    if not path.is_file():
        raise VitqError(f"{path} does not exist; pass a .pte file or a build folder")
    # A program larger than the machine's memory cannot run here; reading it would only fail late.
    size, memory = path.stat().st_size, _physical_memory()
    if memory is not None and size > memory:
        raise VitqError(f"{path} is {size / 1e9:.1f} GB, more than this machine's {memory / 1e9:.1f} GB of memory; "
                        "it is not a program vitq-edge built (rebuild with `vitq-edge build`)")
    try:
        return path.read_bytes()
    except MemoryError:
        raise VitqError(f"{path} ({size / 1e9:.1f} GB) does not fit in memory; rebuild with `vitq-edge build`") \
            from None
    except OSError as exc:
        raise VitqError(f"cannot read {path} ({exc.strerror})") from None


class HostProgram:
    """A loaded `forward` method; `__call__` runs a batch image by image.

    Programs are exported for batch 1 (what an app feeds), so a batch is split.
    """

    def __init__(self, pte: str | Path | bytes):
        self.label = "the program" if isinstance(pte, bytes) else str(pte)
        if not isinstance(pte, bytes):
            pte = _read_program(Path(pte))
        # The runtime reads from these bytes and the program while the method runs:
        # both must outlive it, or execution touches freed memory.
        self._data = pte
        # Paper-recipe programs call vitq:: ops: their kernels must be registered before load_method.
        self.custom_ops = program_custom_ops(pte)
        self.kernels_version = load_kernels() if self.custom_ops else None
        try:
            with _runtime_logs_filtered():
                self._program = Runtime.get().load_program(pte)
                self._method = self._program.load_method("forward")
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
            raise VitqError(f"{self.label} is not a loadable ExecuTorch program ({first}); rebuild it with "
                            "`vitq-edge build`") from None
        if self._method is None:
            raise VitqError(f"{self.label} has no 'forward' method; rebuild it with `vitq-edge build`")

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        try:
            with _runtime_logs_filtered():  # ExecuTorch logs a failed run on stderr before raising
                outs = [self._method.execute([batch[i : i + 1].contiguous()])[0] for i in range(batch.shape[0])]
        except (RuntimeError, ValueError, TypeError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
            raise VitqError(f"{self.label} loaded but failed when run on an input of shape "
                            f"{list(batch.shape[1:])} ({first}); check that it matches the manifest's "
                            "input, or rebuild with `vitq-edge build`") from None
        return torch.cat(outs)
