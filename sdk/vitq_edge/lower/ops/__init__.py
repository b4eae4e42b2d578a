"""The `vitq::` custom operators: schema, `.out` variant and Python reference, one file per op.

Each op is registered twice with `torch.library` (ExecuTorch's `to_executorch()` pairs
`vitq::name` with `vitq::name.out` by identical arguments): the functional form, which
the exported graph calls, and the out variant, which the program runs and which
runtime/kernels/ implements in C++. The Python reference is the op's definition; the
simulated model computes the same thing with fake quantization, and the kernel tests
compare the C++ kernels with it.
"""

from __future__ import annotations

from vitq_edge.lower.ops import attention, gelu_shift_log2, linear, log_linear  # noqa: F401  (defines the ops)

OP_NAMES = ["vitq::linear", "vitq::attention", "vitq::gelu_shift_log2", "vitq::log_linear"]
