"""vitq::linear — a quantized linear layer on int8 codes, with its prologue fused.

    vitq::linear(x, weight, weight_scale, weight_zero, bias, input_scale, input_zero,
                 input_qmin, input_qmax, outlier_threshold, weight_bits, prologue,
                 norm_weight, norm_bias, norm_eps) -> out

x float [..., K] -> out float [..., N]. Step by step (the C++ kernel does the same):

1. prologue: 0 none, 1 LayerNorm over K (norm_weight, norm_bias [K], norm_eps),
   2 GELU (by table, its exact erf form on a grid), both as quant/arith.py defines them
   (layer_norm, gelu_table). Fusing them is what keeps LayerNorm's output from ever
   being written in float.
2. input codes, uniform: c = clamp(round(x / s) + z, qmin, qmax) with (s, z) from
   input_scale / input_zero, shape [1] (per tensor) or [T] (per token position, the
   PPOQ quantizer: T = x.shape[-2]).
3. outliers (outlier_threshold > 0): where |x| > threshold the code is z (value 0) and
   x itself is added back through a float product with the weight's values.
4. weights: integer w' in [-2^(b-1), 2^(b-1) - 1], value (w' - weight_zero[n]) *
   weight_scale[n]. b <= 4: uint8 [N, ceil(K/2)], two per byte, low nibble first,
   nibble = w' + 8 (XNNPACK's qc4w layout); otherwise int8 [N, K].
5. out = sum_k (c - z) * s * (w' - weight_zero) * weight_scale + bias: an int8 x int8
   GEMM with int32 accumulation, scaled once per output. 4-bit weights are unpacked to
   int8 when the kernel prepacks them. The GEMM is ours (runtime/kernels/qs8_gemm*.cpp) on
   aarch64 and on x86 with VNNI, XNNPACK's qd8_f32_qc8w elsewhere; the sums are exact
   either way, so every path gives the same bits.
"""

from __future__ import annotations

import torch

from vitq_edge.lower.ops.library import define
from vitq_edge.quant import arith

PROLOGUE_NONE, PROLOGUE_LAYER_NORM, PROLOGUE_GELU = 0, 1, 2

ARGS = ("Tensor x, Tensor weight, Tensor weight_scale, Tensor weight_zero, Tensor bias, "
        "Tensor input_scale, Tensor input_zero, int input_qmin, int input_qmax, "
        "float outlier_threshold, int weight_bits, int prologue, "
        "Tensor norm_weight, Tensor norm_bias, float norm_eps")


def pack_int4(w: torch.Tensor) -> torch.Tensor:
    """int [N, K] in [-8, 7] -> uint8 [N, ceil(K/2)], low nibble = even k, nibble = w + 8."""
    n, k = w.shape
    nib = (w.to(torch.int16) + 8).to(torch.uint8)
    if k % 2:
        nib = torch.cat([nib, torch.full((n, 1), 8, dtype=torch.uint8)], 1)
    return nib[:, 0::2] | (nib[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    low = (packed & 0xF).to(torch.int16) - 8
    high = (packed >> 4).to(torch.int16) - 8
    return torch.stack([low, high], -1).reshape(packed.shape[0], -1)[:, :k]


def apply_prologue(x: torch.Tensor, prologue: int, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                   norm_eps: float) -> torch.Tensor:
    if prologue == PROLOGUE_LAYER_NORM:
        return arith.layer_norm(x, norm_weight, norm_bias, norm_eps)
    if prologue == PROLOGUE_GELU:
        return arith.gelu_table(x)
    return x


def unpack_weight(weight: torch.Tensor, weight_bits: int, k: int) -> torch.Tensor:
    """The integers w' [N, K] (as float)."""
    return (unpack_int4(weight, k) if weight_bits <= 4 else weight.to(torch.int16)).float()


def reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, weight_zero: torch.Tensor,
              bias: torch.Tensor, input_scale: torch.Tensor, input_zero: torch.Tensor, input_qmin: int,
              input_qmax: int, outlier_threshold: float, weight_bits: int, prologue: int,
              norm_weight: torch.Tensor, norm_bias: torch.Tensor, norm_eps: float) -> torch.Tensor:
    x = apply_prologue(x, prologue, norm_weight, norm_bias, norm_eps)
    scale, zero = input_scale, input_zero
    if scale.numel() > 1:  # one (scale, zero) per token position
        scale, zero = scale[:, None], zero[:, None]
    w = unpack_weight(weight, weight_bits, x.shape[-1])
    return arith.quantized_linear(x, scale, zero, input_qmin, input_qmax, outlier_threshold, w, weight_zero,
                                  weight_scale, bias)


def fake(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, *args) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight_scale.shape[0]))


define("linear", ARGS, reference, fake)
