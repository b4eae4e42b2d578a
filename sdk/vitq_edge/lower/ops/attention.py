"""vitq::attention — multi-head self-attention on integer codes.

    vitq::attention(qkv, num_heads, scale,
                    q_scale, q_zero, q_qmin, q_qmax, k_scale, k_zero, k_qmin, k_qmax,
                    v_scale, v_zero, v_qmin, v_qmax,
                    p_scale, p_zero, p_qmin, p_qmax, p_log_bits, p_steps_per_octave) -> out

qkv float [B, T, 3*H*D] (the qkv linear's output, timm's layout: q | k | v, heads
inside each) -> out float [B, T, H*D] (heads concatenated, ready for proj). Per head:

1. q, k, v codes, uniform per tensor: c = clamp(round(x / s) + z, qmin, qmax);
2. dot products (sum_d (cq - zq)(ck - zk)) [int32], alpha = q_scale * k_scale * scale;
uniform probability codes (p_log_bits == 0; arith.integer_softmax_codes), in integers:
3. below the row's largest dot product m, Y = min(round(f32(m - dot) * f32(256 log2(e)
   alpha)), 5120) and the exponential E = arith.exp2_fixed(Y) ~ 2^20 exp(-alpha (m - dot));
4. probability codes c = clamp(round(f32(E) * f32(1 / (sum E * p_scale))) + p_zero, p_qmin, p_qmax);
5. out = sum_j (cp_j - zp)(cv_j - zv) [int32] * p_scale * v_scale;
log probability codes of p_log_bits bits, k = p_steps_per_octave (ADFQ-ViT's log softmax
quantizer; arith.integer_log_attention):
3. codes below the row's largest dot product m: u = min(round(f32(m - dot) * f32(k log2(e)
   alpha)), 2^p_log_bits - 1), the softmax's log codes relative to its largest probability;
4. integer levels L = round(2^P 2^(-u/k)) (arith.integer_levels; P = arith.level_bits: 14
   unless T * max|cv - zv| needs fewer), 0 for the zero code;
5. out = f32(sum_j L_j (cv_j - zv)) [int32] * f32(v_scale / sum_j L_j).
   p_scale (the calibrated delta) shapes the float model's quantizer in reconstruction only.
"""

from __future__ import annotations

import torch

from vitq_edge.lower.ops.library import define
from vitq_edge.quant import arith

ARGS = ("Tensor qkv, int num_heads, float scale, "
        "float q_scale, int q_zero, int q_qmin, int q_qmax, "
        "float k_scale, int k_zero, int k_qmin, int k_qmax, "
        "float v_scale, int v_zero, int v_qmin, int v_qmax, "
        "float p_scale, int p_zero, int p_qmin, int p_qmax, int p_log_bits, int p_steps_per_octave")


def reference(qkv: torch.Tensor, num_heads: int, scale: float,
              q_scale: float, q_zero: int, q_qmin: int, q_qmax: int,
              k_scale: float, k_zero: int, k_qmin: int, k_qmax: int,
              v_scale: float, v_zero: int, v_qmin: int, v_qmax: int,
              p_scale: float, p_zero: int, p_qmin: int, p_qmax: int,
              p_log_bits: int, p_steps_per_octave: int) -> torch.Tensor:
    b, t, c3 = qkv.shape
    d = c3 // (3 * num_heads)
    q, k, v = qkv.reshape(b, t, 3, num_heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    p_uniform = None if p_log_bits else (p_scale, p_zero, p_qmin, p_qmax)
    p_log = (p_scale, p_log_bits, p_steps_per_octave) if p_log_bits else None
    out = arith.integer_attention(q, k, v, scale, (q_scale, q_zero, q_qmin, q_qmax), (k_scale, k_zero, k_qmin, k_qmax),
                                  (v_scale, v_zero, v_qmin, v_qmax), p_uniform, p_log)
    return out.transpose(1, 2).reshape(b, t, num_heads * d)


def fake(qkv: torch.Tensor, num_heads: int, *args) -> torch.Tensor:
    b, t, c3 = qkv.shape
    return qkv.new_empty((b, t, c3 // 3))


define("attention", ARGS, reference, fake)
