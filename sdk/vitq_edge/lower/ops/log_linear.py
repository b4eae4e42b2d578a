"""vitq::log_linear — a linear layer whose input arrives as log codes (fc2 after Shift-Log2).

    vitq::log_linear(codes, weight, weight_scale, weight_zero, bias, delta, bits,
                     steps_per_octave, weight_bits) -> out

codes uint8 [..., K] (from vitq::gelu_shift_log2) stand for delta * 2^(-code/k), code
2^b - 1 for 0; weights as in vitq::linear. out = sum_k value_k (w' - wz) ws + bias
(quant/arith.py: log_linear, the sums exact), where the bias already holds fc2's bias
minus shift * W * 1 (the un-shift of Shift-Log2).
"""

from __future__ import annotations

import torch

from vitq_edge.lower.ops.library import define
from vitq_edge.lower.ops.linear import unpack_weight
from vitq_edge.quant import arith

ARGS = ("Tensor codes, Tensor weight, Tensor weight_scale, Tensor weight_zero, Tensor bias, "
        "float delta, int bits, int steps_per_octave, int weight_bits")


def reference(codes: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, weight_zero: torch.Tensor,
              bias: torch.Tensor, delta: float, bits: int, steps_per_octave: int, weight_bits: int) -> torch.Tensor:
    levels = arith.log_values(codes.float(), torch.tensor(delta, dtype=torch.float32), bits, steps_per_octave)
    w = unpack_weight(weight, weight_bits, codes.shape[-1])
    return arith.log_linear(levels, w, weight_zero, weight_scale, bias)


def fake(codes: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, *args) -> torch.Tensor:
    return codes.new_empty((*codes.shape[:-1], weight_scale.shape[0]), dtype=torch.float32)


define("log_linear", ARGS, reference, fake)


def gelu_then_log_linear(x: torch.Tensor, gelu_args: list, *args) -> torch.Tensor:
    """fc2 of an adfq block on its float input: GELU's Shift-Log2 codes (vitq::gelu_shift_log2 with
    gelu_args = shift, delta, bits, steps_per_octave), then vitq::log_linear(codes, *args). The lowering,
    tools/op_costs.py and the kernel tests all compose the two ops here."""
    return torch.ops.vitq.log_linear(torch.ops.vitq.gelu_shift_log2(x, *gelu_args), *args)
