"""The `vitq::` custom operators: schema, `.out` variant and Python reference, one file per op.

Each op is registered twice with `torch.library` (ExecuTorch's `to_executorch()` pairs
`vitq::name` with `vitq::name.out` by identical arguments): the functional form, which
the exported graph calls, and the out variant, which the program runs and which
runtime/kernels/ implements in C++. The Python reference is the op's definition; the
simulated model computes the same thing with fake quantization, and the kernel tests
compare the C++ kernels with it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

LIBRARY = torch.library.Library("vitq", "DEF")  # noqa: TOR901 (Library("DEF") keeps int args as int)


def define(name: str, args: str, reference: Callable[..., torch.Tensor],
           fake: Callable[..., torch.Tensor]) -> None:
    """Define `vitq::name(args) -> Tensor` and `vitq::name.out(args, *, Tensor(a!) out)`."""
    LIBRARY.define(f"{name}({args}) -> Tensor")
    LIBRARY.define(f"{name}.out({args}, *, Tensor(a!) out) -> Tensor(a!)")
    LIBRARY.impl(name, reference, "CompositeExplicitAutograd")

    def out_variant(*args, out: torch.Tensor) -> torch.Tensor:
        result = reference(*args)
        out.resize_(result.shape)
        out.copy_(result)
        return out

    LIBRARY.impl(f"{name}.out", out_variant, "CompositeExplicitAutograd")
    torch.library.register_fake(f"vitq::{name}")(fake)


from vitq_edge.lower.ops import attention, gelu_shift_log2, linear, log_linear  # noqa: E402,F401

OP_NAMES = ["vitq::linear", "vitq::attention", "vitq::gelu_shift_log2", "vitq::log_linear"]
