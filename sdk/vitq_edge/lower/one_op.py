"""A program of one `vitq::` op: what the kernel tests and tools/op_costs.py run.

The op's tensor arguments are held as constants of the program, as a build holds a
model's weights, and its first argument is the program's input.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class OneOp(torch.nn.Module):
    """`op(x, *args)` with every tensor argument but the first held as a buffer."""

    def __init__(self, op: Callable[..., torch.Tensor], args: Sequence) -> None:
        super().__init__()
        self.op = op
        self.args = []
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                self.register_buffer(f"c{i}", a)
                a = f"c{i}"
            self.args.append(a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, *[getattr(self, a) if isinstance(a, str) else a for a in self.args])


def one_op_program(op: Callable[..., torch.Tensor], x: torch.Tensor, args: Sequence) -> bytes:
    """The ExecuTorch program (.pte bytes) of `op(x, *args)`, without delegation."""
    from executorch.exir import to_edge

    return to_edge(torch.export.export(OneOp(op, args), (x,), strict=False)).to_executorch().buffer
