"""The integer arithmetic of every quantizer: real values <-> integer codes.

One definition each, used by the simulation (`quantizers.py` builds its fake-quant
forward from these functions), by the property tests, and as the reference the
runtime kernels are tested against. Codes are returned as float tensors holding
integers (exact up to 2^24), so the same functions run inside autograd.

    uniform:      code = clamp(round(x / scale) + zero_point, qmin, qmax)
                  value = (code - zero_point) * scale
    log (base 2^(1/k), k = 1 for log2, k = 2 for log-sqrt2), x >= 0:
                  code = clamp(round(-k * log2(x / delta)), 0, 2^b - 2)
                  value = delta * 2^(-code / k);  code 2^b - 1 means exactly 0
                  (used for x below the smallest level, and for x == 0)
    per-patch outlier-aware (PPOQ): |x| > threshold passes through unquantized;
                  the rest is uniform with one (scale, zero point) per token position
    shift-log2:   x' = x + shift (> 0 for every post-GELU value), log-coded;
                  the consumer subtracts `shift` (folded into fc2's bias)
"""

from __future__ import annotations

import torch

# Smallest scale: keeps constant / all-zero tensors finite (no 0/0).
EPS = 1e-8


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() with a straight-through gradient (identity) when autograd is on.

    x + (round(x) - x) equals round(x) exactly for the magnitudes codes have.
    """
    if not x.requires_grad:
        return torch.round(x)
    return x + (torch.round(x) - x).detach()


# ---- uniform -------------------------------------------------------------------------

def uniform_range(bits: int, signed: bool) -> tuple[int, int]:
    """(qmin, qmax) of a b-bit code: signed [-2^(b-1), 2^(b-1)-1] or unsigned [0, 2^b-1]."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def uniform_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | float,
                  qmin: int, qmax: int) -> torch.Tensor:
    return torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)


def uniform_values(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | float) -> torch.Tensor:
    return (codes - zero_point) * scale


def fake_uniform(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | float,
                 qmin: int, qmax: int) -> torch.Tensor:
    """The value the device sees after quantizing x: values(codes(x))."""
    return uniform_values(uniform_codes(x, scale, zero_point, qmin, qmax), scale, zero_point)


def symmetric_params(absmax: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (0) of a signed symmetric quantizer covering [-absmax, absmax]."""
    scale = torch.clamp(absmax / (2 ** (bits - 1) - 1), min=EPS)
    return scale, torch.zeros_like(scale)


def asymmetric_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point of an unsigned quantizer covering [lo, hi] (0 always representable)."""
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    scale = torch.clamp((hi - lo) / (2**bits - 1), min=EPS)
    zero_point = torch.clamp(torch.round(-lo / scale), 0, 2**bits - 1)
    return scale, zero_point


# ---- log2 / log-sqrt2 ---------------------------------------------------------------

def log_zero_code(bits: int) -> int:
    """The code reserved for exact zero."""
    return 2**bits - 1


def log_codes(x: torch.Tensor, delta: torch.Tensor | float, bits: int, k: int) -> torch.Tensor:
    """Codes of non-negative x on the levels delta * 2^(-q/k), q = 0 .. 2^b - 2."""
    zero = log_zero_code(bits)
    ratio = torch.clamp(x / delta, min=1e-30)  # log2(0) -> finite; such x become the zero code below
    q = round_ste(-k * torch.log2(ratio))
    codes = torch.clamp(q, 0, zero - 1)
    underflow = (q > zero - 1) | (x <= 0)
    return torch.where(underflow, torch.full_like(codes, zero), codes)


def log_values(codes: torch.Tensor, delta: torch.Tensor | float, bits: int, k: int) -> torch.Tensor:
    zero = log_zero_code(bits)
    values = delta * torch.exp2(-codes / k)
    return torch.where(codes == zero, torch.zeros_like(values), values)


def fake_log(x: torch.Tensor, delta: torch.Tensor | float, bits: int, k: int) -> torch.Tensor:
    return log_values(log_codes(x, delta, bits, k), delta, bits, k)


# ---- per-patch outlier-aware (ADFQ-ViT PPOQ) ----------------------------------------

def outlier_mask(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """True where |x| > threshold: those values stay in full precision."""
    return x.abs() > threshold


def fake_ppoq(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
              threshold: float) -> torch.Tensor:
    """x [..., tokens, channels]; scale/zero_point [tokens, 1], one pair per token position.

    Inliers go through the per-token uniform quantizer; outliers are zeroed before it
    and added back after, exactly (the deployed op is a low-bit GEMM plus a sparse
    float GEMM over the outliers).
    """
    mask = outlier_mask(x, threshold)
    inliers = torch.where(mask, torch.zeros_like(x), x)
    qmin, qmax = uniform_range(bits, signed=False)
    quantized = fake_uniform(inliers, scale, zero_point, qmin, qmax)
    return torch.where(mask, x, quantized)


# ---- shift-log2 (ADFQ-ViT, post-GELU) ------------------------------------------------

def fake_shift_log(x: torch.Tensor, shift: torch.Tensor | float, delta: torch.Tensor | float, bits: int,
                   k: int) -> torch.Tensor:
    """The shifted, log-quantized value x' = Q(x + shift); the consumer subtracts `shift`."""
    return fake_log(x + shift, delta, bits, k)
