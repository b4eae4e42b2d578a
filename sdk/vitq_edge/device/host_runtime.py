"""Run a .pte in ExecuTorch's Python runtime on this machine."""

from __future__ import annotations

from pathlib import Path

import torch
from executorch.runtime import Runtime

from vitq_edge.errors import VitqError
from vitq_edge.lower.kernels import load_kernels, program_custom_ops


class HostProgram:
    """A loaded `forward` method; `__call__` runs a batch image by image.

    Programs are exported for batch 1 (what an app feeds), so a batch is split.
    """

    def __init__(self, pte: str | Path | bytes):
        label = "the program" if isinstance(pte, bytes) else str(pte)
        if not isinstance(pte, bytes):
            path = Path(pte)
            if not path.is_file():
                raise VitqError(f"{path} does not exist; pass a .pte file or a build folder")
            pte = path.read_bytes()
        # The runtime reads from these bytes and the program while the method runs:
        # both must outlive it, or execution touches freed memory.
        self._data = pte
        # Paper-recipe programs call vitq:: ops: their kernels must be registered before load_method.
        self.custom_ops = program_custom_ops(pte)
        self.kernels_version = load_kernels() if self.custom_ops else None
        try:
            self._program = Runtime.get().load_program(pte)
            self._method = self._program.load_method("forward")
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
            raise VitqError(f"{label} is not a loadable ExecuTorch program ({first}); rebuild it with "
                            "`vitq-edge build`") from None
        if self._method is None:
            raise VitqError(f"{label} has no 'forward' method; rebuild it with `vitq-edge build`")

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        outs = [self._method.execute([batch[i : i + 1].contiguous()])[0] for i in range(batch.shape[0])]
        return torch.cat(outs)
