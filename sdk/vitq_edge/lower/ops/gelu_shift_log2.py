"""vitq::gelu_shift_log2 — GELU fused with ADFQ-ViT's Shift-Log2 quantizer.

    vitq::gelu_shift_log2(x, shift, delta, bits, steps_per_octave) -> codes (uint8)

codes = log codes of GELU(x) + shift (GELU by table: arith.gelu_table) on the levels delta * 2^(-q/k), q = 0 .. 2^b - 2,
code 2^b - 1 = exactly 0 (quant/arith.py: log_codes). `shift` (>= -min GELU) makes every
value positive; fc2 (vitq::log_linear) carries -shift * W * 1 in its bias.
"""

from __future__ import annotations

import torch

from vitq_edge.lower.ops.library import define
from vitq_edge.quant import arith

ARGS = "Tensor x, float shift, float delta, int bits, int steps_per_octave"


def reference(x: torch.Tensor, shift: float, delta: float, bits: int, steps_per_octave: int) -> torch.Tensor:
    shifted = arith.gelu_table(x) + torch.tensor(shift, dtype=torch.float32)
    delta_t = torch.tensor(delta, dtype=torch.float32)
    return arith.log_codes(shifted, delta_t, bits, steps_per_octave).to(torch.uint8)


def fake(x: torch.Tensor, *args) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=torch.uint8)


define("gelu_shift_log2", ARGS, reference, fake)
