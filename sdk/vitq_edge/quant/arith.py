"""The integer arithmetic of every quantizer: real values <-> integer codes.

One definition each, used by the simulation (`quantizers.py` builds its fake-quant
forward from these functions), by the property tests, and as the reference the
runtime kernels are tested against. Codes are returned as float tensors holding
integers (exact up to 2^24), so the same functions run inside autograd (log codes
carry no gradient: fake_log writes its straight-through one out).

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

A change to what any of these computes changes the bits of every program built before it:
raise vitq_edge.runtime.ARITHMETIC_VERSION with it.
"""

from __future__ import annotations

import functools

import torch

# Smallest scale: keeps constant / all-zero tensors finite (no 0/0).
EPS = 1e-8
# The integer kernels hold every code in int8 / uint8: no quantizer that runs on them is wider.
MAX_CODE_BITS = 8


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
# Levels delta * 2^(-q/k); k, in the formulas below, is `steps_per_octave` (1: log2, 2: log-sqrt2).

# The floor of x / delta before coding: the smallest normal float32 (2^-126), so every ratio a
# normal float holds gets its exact code. A subnormal ratio (x < delta * 1.2e-38) takes the code of
# 2^-126 where the ladder reaches that far (8 bits, 1-2 steps per octave), else the zero code: a
# value within delta * 2^-126 of the exact level. (The earlier floor, 1e-30, lay inside those
# ladders and gave ratios below it a wrong level.) quant_math.h: kRatioFloor.
LOG_RATIO_FLOOR = torch.finfo(torch.float32).tiny


def log_zero_code(bits: int) -> int:
    """The code reserved for exact zero."""
    return 2**bits - 1


def _log_thresholds(steps_per_octave: int) -> torch.Tensor:
    """The smallest float32 >= 2^((j + 0.5) / k), j < k: where k * log2(m), m in [1, 2), rounds up to j + 1."""
    t = torch.exp2((torch.arange(steps_per_octave, dtype=torch.float64) + 0.5) / steps_per_octave)
    tf = t.float()
    return torch.where(tf.double() < t, torch.nextafter(tf, torch.tensor(2.0)), tf)


@functools.cache
def _log_ladder(bits: int, steps_per_octave: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(boundaries, levels, floored) of the code ladder, all float32.

    With ratio = m * 2^e (m in [1, 2)), round(-k log2(ratio)) = -k e - #{j : m >= T_j}
    (T_j = `_log_thresholds`; irrational, so no ties). So the rounded value is <= n - 1
    exactly when ratio >= T_j * 2^e with n = -k e - j. boundaries (ascending) hold these
    for n = 2^b - 1 down to 0, so a ratio reaching i of them has code max(2^b - 1 - i, 0);
    the last, T_0, is where the code would turn negative (clamped to 0: the straight-
    through gradient stops there). Multiplying by 2^e is exact in float32 down to the
    smallest normal; lower boundaries sit at LOG_RATIO_FLOOR, which every ratio reaches
    (`floored`: the ratio is clamped to it first, as the kernels do). levels[i] = delta's
    factor for i boundaries reached: 0 (zero code), then 2^(-code / k) in double rounded
    once to float32.
    """
    zero = log_zero_code(bits)
    thresholds = _log_thresholds(steps_per_octave).double()
    bounds = []
    for n in range(zero + 1):  # boundary between rounded values n - 1 and n
        j = (-n) % steps_per_octave
        e = -(n + j) // steps_per_octave
        bounds.append(max(float(thresholds[j]) * 2.0**e, LOG_RATIO_FLOOR))
    boundaries = torch.tensor(bounds[::-1], dtype=torch.float32)
    codes = (zero - torch.arange(zero + 2, dtype=torch.float64)).clamp(min=0)
    levels = torch.where(codes == zero, 0.0, torch.exp2(-codes / steps_per_octave)).float()
    return boundaries, levels, bool(boundaries[0] <= LOG_RATIO_FLOOR)


def _log_reached(x: torch.Tensor, delta: torch.Tensor | float, bits: int, steps_per_octave: int) -> torch.Tensor:
    """How many ladder boundaries x / delta reaches (int64; `_log_ladder`)."""
    boundaries, _, floored = _log_ladder(bits, steps_per_octave)
    with torch.no_grad():
        ratio = x / delta
        if floored:  # positive x keeps at least the floor's code; x <= 0 reaches nothing (zero code)
            ratio = torch.where(x > 0, ratio.clamp(min=LOG_RATIO_FLOOR), ratio)
        return torch.bucketize(ratio, boundaries, right=True)


def log_codes(x: torch.Tensor, delta: torch.Tensor | float, bits: int, steps_per_octave: int) -> torch.Tensor:
    """Codes of non-negative x on the levels delta * 2^(-q/k), q = 0 .. 2^b - 2 (no gradient).

    q = round(-k * log2(x / delta)) computed exactly, without log2: a log2 of 1-ulp
    accuracy would round differently near the level boundaries. The kernels
    (quant_math.h: LogCoder) count the same thresholds per octave; here the ratio is
    placed among the ladder's boundaries (`_log_ladder`) in one search. x <= 0 and
    ratios below the lowest level take the zero code 2^b - 1.
    """
    return (log_zero_code(bits) - _log_reached(x, delta, bits, steps_per_octave)).clamp_(min=0).to(x.dtype)


def log_values(codes: torch.Tensor, delta: torch.Tensor | float, bits: int, steps_per_octave: int) -> torch.Tensor:
    """delta * 2^(-code / k) (the power in double, rounded once to float32), 0 for the zero code."""
    _, levels, _ = _log_ladder(bits, steps_per_octave)
    return delta * levels[log_zero_code(bits) - codes.long()]


class _FakeLog(torch.autograd.Function):
    """values(codes(x)) with the straight-through gradient of the continuous -k log2(x / delta).

    Written out rather than traced: autograd of the code computation kept a dozen
    full-size tensors per call (the attention probabilities of a 224-px ViT-S are 13 M
    values per batch of 32). With value = delta * 2^(-q/k) and q = -k log2(x / delta):
    d value / d x = value / x on the ladder; d value / d delta = 0 there (the two paths
    cancel) and value / delta where x / delta lies above the top level (q clamped at 0).
    Values below the ladder (zero code) pass no gradient. `round_gradient=False`: codes
    from detached inputs, so x gets none and delta learns value / delta everywhere.
    """

    @staticmethod
    def forward(ctx, x, delta, bits, steps_per_octave, round_gradient):  # noqa: ANN001, ANN205
        reached = _log_reached(x, delta, bits, steps_per_octave)
        _, levels, _ = _log_ladder(bits, steps_per_octave)
        values = delta * levels[reached]
        top = reached > log_zero_code(bits) if round_gradient else None  # the code clamped at 0
        ctx.save_for_backward(x, delta, values, reached, top)
        ctx.round_gradient = round_gradient
        return values

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        x, delta, values, reached, top = ctx.saved_tensors
        coded = reached > 0  # not the zero code
        grad_x = grad_delta = None
        if ctx.round_gradient:
            on_ladder = coded & ~top
            if ctx.needs_input_grad[0]:
                grad_x = torch.where(on_ladder, grad * values / x, torch.zeros_like(grad))
            delta_part = top
        else:
            delta_part = coded
        if ctx.needs_input_grad[1]:
            g = torch.where(delta_part, grad * values / delta, torch.zeros_like(grad))
            grad_delta = g.sum() if delta.dim() == 0 else g.sum_to_size(delta.shape)
        return grad_x, grad_delta, None, None, None


def fake_log(x: torch.Tensor, delta: torch.Tensor | float, bits: int, steps_per_octave: int,
             round_gradient: bool = True) -> torch.Tensor:
    """The value the device sees: values(codes(x)), differentiable as `_FakeLog` describes."""
    if torch.is_grad_enabled() and isinstance(delta, torch.Tensor) and (x.requires_grad or delta.requires_grad):
        return _FakeLog.apply(x, delta, bits, steps_per_octave, round_gradient)
    # levels[reached] is log_values(log_codes(x)) without the two int64 passes between them
    # (they cost more than the search on a 25 M-value attention map).
    _, levels, _ = _log_ladder(bits, steps_per_octave)
    return delta * levels[_log_reached(x, delta, bits, steps_per_octave)]


# ---- per-patch outlier-aware (ADFQ-ViT PPOQ) ----------------------------------------

def outlier_mask(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """True where |x| > threshold: those values stay in full precision."""
    return x.abs() > threshold


def fake_ppoq(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
              threshold: float, round_gradient: bool = True) -> torch.Tensor:
    """x [..., tokens, channels]; scale/zero_point [tokens, 1], one pair per token position.

    Inliers go through the per-token uniform quantizer; outliers are zeroed before it
    and added back after, exactly (the deployed op is a low-bit GEMM plus a sparse
    float GEMM over the outliers). Same value either way, `round_gradient=False` computes
    the codes from detached x and scale, as the ADFQ-ViT code does: the scale learns only
    through the dequantization and x gets no gradient.
    """
    if not round_gradient:
        x = x.detach()
    mask = outlier_mask(x, threshold)
    inliers = torch.where(mask, torch.zeros_like(x), x)
    qmin, qmax = uniform_range(bits, signed=False)
    codes = uniform_codes(inliers, scale if round_gradient else scale.detach(), zero_point, qmin, qmax)
    return torch.where(mask, x, uniform_values(codes, scale, zero_point))


# ---- shift-log2 (ADFQ-ViT, post-GELU) ------------------------------------------------

def fake_shift_log(x: torch.Tensor, shift: torch.Tensor | float, delta: torch.Tensor, bits: int,
                   steps_per_octave: int, round_gradient: bool = True) -> torch.Tensor:
    """The shifted, log-quantized value x' = Q(x + shift); the consumer subtracts `shift`.

    `round_gradient=False`: codes from detached inputs (as fake_ppoq), delta learns through
    the dequantization only.
    """
    return fake_log(x + shift, delta, bits, steps_per_octave, round_gradient)


# ---- float steps the kernels compute bit for bit ------------------------------------
#
# LayerNorm and GELU (with its exp) sit between the integer ops; a 1-ulp difference in
# any of them moves a value across the next quantizer's code boundary now and then.
# So each has one definition here and in runtime/kernels/quant_math.h: either float32
# operations in a fixed order (no fused multiply-add: the kernels build with
# -ffp-contract=off, and torch's elementwise ops round each step), or double
# precision rounded once to float32. Constants are float32 values (hex in the C++).

_LOG2E = float.fromhex("0x1.715476p+0")
_LN2_HI = float.fromhex("0x1.62e4p-1")  # 16 significant bits: n * ln2_hi is exact
_LN2_LO = float.fromhex("0x1.7f7d1cp-20")
_EXP_POLY = [float.fromhex(h) for h in ("0x1.a01a02p-13", "0x1.6c16c2p-10", "0x1.111112p-7",
                                        "0x1.555556p-5", "0x1.555556p-3", "0x1p-1", "0x1p+0", "0x1p+0")]
_SQRT1_2 = float.fromhex("0x1.6a09e6p-1")
# erfc(a) ~ t (a1 + t (a2 + ... + t a5)) exp(-a^2), t = 1 / (1 + p a): Abramowitz & Stegun 7.1.26.
_ERFC_P = float.fromhex("0x1.4f740ap-2")
_ERFC_A = [float.fromhex(h) for h in ("0x1.0fb844p+0", "-0x1.7401c6p+0", "0x1.6be1c6p+0",
                                      "-0x1.23531cp-2", "0x1.04f20cp-2")]  # a5 .. a1


def exp_nonpositive(x: torch.Tensor) -> torch.Tensor:
    """exp(x) for x <= 0 in float32 (within 1 ulp of expf; below -87 it is 0).

    Cody-Waite reduction x = n ln2 + r, Taylor series of exp(r) to r^7, times 2^n.
    Each step rounds to float32 as one operation of the kernels does (in place where no
    gradient is taken: the same roundings, a third of the memory traffic).
    """
    xc = torch.clamp(x, min=-87.0)
    n = torch.round(xc * _LOG2E)
    r = (xc - n * _LN2_HI) - n * _LN2_LO
    p = torch.full_like(r, _EXP_POLY[0])
    for c in _EXP_POLY[1:]:
        p = p * r + c if p.requires_grad or r.requires_grad else p.mul_(r).add_(c)
    two_n = ((n.to(torch.int32) + 127) << 23).view(torch.float32)
    return torch.where(x >= -87.0, p * two_n, torch.zeros_like(p))


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU(x) = x/2 (1 + erf(x / sqrt 2)) in float32 (|error| <= 1.5e-7 |x| / 2 + rounding).

    Written through erfc(|x| / sqrt 2) so the negative side has no cancellation.
    """
    a = torch.abs(x * _SQRT1_2)
    t = 1.0 / (1.0 + _ERFC_P * a)
    poly = torch.full_like(t, _ERFC_A[0])
    for c in _ERFC_A[1:]:
        poly = poly * t + c if t.requires_grad else poly.mul_(t).add_(c)
    tail = (poly * t) * exp_nonpositive(-(a * a))  # erfc(|x| / sqrt 2)
    half = 0.5 * x
    return torch.where(x >= 0, half * (2.0 - tail), half * tail)


# GELU by table, what every GELU of the integer programs computes: the GELU above at the nearest
# point of a grid of step 1/32 on [-4, 4) (256 points: one byte indexes them, so the kernels code
# GELU's output by one table lookup per value), x itself above the grid (x - GELU(x) = x Phi(-x) <
# 1.3e-4 there) and GELU(-4) below it (|GELU(x)| < 1.3e-4 there). At most 0.018 from GELU (half a
# step times GELU's largest slope, 1.13). A fixed absolute resolution: it costs most where the post-GELU
# values are small. Measured on validation splits: the real model's adfq W8A8 program -0.37 dB logit SQNR
# (agreement +0.3 points), W4A4 none (docs/validation/gelu-table-adfq-*.md); the bundled model -0.15 to
# -0.34 dB, agreement equal or better (gelu-table-bundled.md); a 32-wide random test ViT, whose
# activations are a few tenths, loses 12 dB at 8 bits.
GELU_GRID_STEPS = 32  # grid points per unit: x * 32 is exact in float32
GELU_TABLE_SIZE = 256


@functools.cache
def gelu_table_values() -> torch.Tensor:
    """GELU at the grid points (i - 128) / 32, i = 0 .. 255 (the kernels' table, runtime/kernels/quant_math.h)."""
    grid = (torch.arange(GELU_TABLE_SIZE, dtype=torch.float32) - GELU_TABLE_SIZE // 2) / GELU_GRID_STEPS
    return gelu(grid)


def gelu_table(x: torch.Tensor) -> torch.Tensor:
    """GELU by table: gelu(round(32 x) / 32) on the grid (round half to even), x above it; a NaN gives gelu(0)."""
    half = GELU_TABLE_SIZE // 2
    r = torch.round(x * GELU_GRID_STEPS)
    index = torch.nan_to_num(r, nan=0.0).clamp(-half, half - 1).long() + half
    return torch.where(r > half - 1, x, torch.take(gelu_table_values().to(x.device), index))


# LayerNorm's sums: LANES interleaved float32 partial sums (lane l takes elements l, l + 8, ...: two
# NEON registers, one AVX register), added ((0 + 1) + (2 + 3)) + ((4 + 5) + (6 + 7)), then the rest of
# the row one by one.
LAYER_NORM_LANES = 8


def _row_sums(v: torch.Tensor) -> torch.Tensor:
    """Sums over the last dimension of float32 v in LayerNorm's fixed order (keepdim)."""
    k = v.shape[-1]
    whole = k - k % LAYER_NORM_LANES
    part = torch.zeros((*v.shape[:-1], LAYER_NORM_LANES), dtype=torch.float32, device=v.device)
    for i in range(0, whole, LAYER_NORM_LANES):
        part = part + v[..., i:i + LAYER_NORM_LANES]
    p = part.unbind(-1)
    total = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]))
    for i in range(whole, k):
        total = total + v[..., i]
    return total.unsqueeze(-1)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension (biased variance) in float32, as torch's own, its sums in a
    fixed order (_row_sums): mean = sum / K, var = sum((x - mean)^2) / K, rstd = f32(1 / sqrt(var + eps))
    (in double), y = ((x - mean) * rstd) * weight + bias. (It was all in double, two lanes per NEON
    instruction instead of four; the change was chosen on the validation split,
    docs/validation/layer-norm-f32-*.md.)"""
    k = x.shape[-1]
    x = x.float()
    centered = x - _row_sums(x) / k
    var = _row_sums(centered * centered) / k
    rstd = (1.0 / torch.sqrt(var.double() + eps)).float()
    return (centered * rstd) * weight.float() + bias.float()


# ---- integer products (what the kernels compute) -------------------------------------

def _abs_max(x: torch.Tensor) -> float:
    lo, hi = torch.aminmax(x)  # one pass, no |x| copy
    return max(-float(lo), float(hi))


def integer_matmul(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """a @ b of integer-valued tensors (codes minus zero points), summed exactly.

    The kernels sum in int32 and convert the sum to float32 once; so does this (dtype float64:
    the exact sums). A float32 matmul is exact while every partial sum stays below 2^24
    (integers there are representable, whatever order the GEMM adds in), so the reduction is
    cut into chunks of that length and the chunks' sums added in float64; a plain float32
    matmul would round, and move values across the next quantizer's code boundaries.
    """
    bound = _abs_max(a) * _abs_max(b) if a.numel() and b.numel() else 0.0
    k = a.shape[-1]
    chunk = k if bound == 0 else int(2.0**24 // bound)
    if chunk >= k:
        return (a.float() @ b.float()).to(dtype)
    if chunk == 0:  # wider than any kernel's codes: plain float64
        return (a.double() @ b.double()).to(dtype)
    total = None
    for start in range(0, k, chunk):
        part = (a[..., start:start + chunk].float() @ b[..., start:start + chunk, :].float()).double()
        total = part if total is None else total + part
    return total.to(dtype)


def integer_linear(x_codes: torch.Tensor, x_zero: torch.Tensor, x_scale: torch.Tensor, w_int: torch.Tensor,
                   w_zero: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """sum_k (c - z) s (w' - wz) ws + b, rounded as the kernel (XNNPACK's qd8 GEMM, ours on aarch64) rounds it.

    x_codes [..., K] with x_zero / x_scale broadcasting per row ([..., 1] or scalars);
    w_int [N, K] integers w', w_zero / w_scale [N]. The GEMM sums (c - z) w' exactly, then
    its epilogue computes fma(sum * s, ws, b) (one rounding for the multiply-add, in its
    x86 FMA3 and aarch64 kernels; here in double: the product is exact there); a nonzero
    wz is subtracted afterwards as (sum_k (c - z)) s (ws wz).
    """
    centered = x_codes - x_zero
    y = (integer_matmul(centered, w_int.t()) * x_scale).double()
    # (sum * s) * ws is exact in double; the bias added there in the same pass (addcmul).
    y = (y * w_scale.double() if bias is None else torch.addcmul(bias.double(), y, w_scale.double())).float()
    if bool(torch.any(w_zero != 0)):
        y = y - (centered.sum(-1, keepdim=True) * x_scale) * (w_scale * w_zero)
    return y


def quantized_linear(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int,
                     threshold: float, w_int: torch.Tensor, w_zero: torch.Tensor, w_scale: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """A linear layer on a uniform (optionally outlier-aware) input, as the vitq::linear kernel computes it.

    scale / zero broadcast per row ([T, 1] per token position, or scalars); threshold > 0
    keeps |x| > threshold out of the integer GEMM (code = zero) and adds x * W for them
    (the PPOQ sparse correction), summed in double and rounded once.
    """
    mask = outlier_mask(x, threshold) if threshold > 0 else None
    inliers = x if mask is None else torch.where(mask, torch.zeros_like(x), x)
    y = integer_linear(uniform_codes(inliers, scale, zero, qmin, qmax), zero, scale, w_int, w_zero, w_scale, bias)
    if mask is not None:
        # Only the input channels holding an outlier (a few in real ViTs) enter the double GEMM: the
        # same sums, as the others add exact zeros.
        cols = mask.reshape(-1, mask.shape[-1]).any(0).nonzero().squeeze(1)
        w = uniform_values(w_int[:, cols], w_scale[:, None], w_zero[:, None])
        outliers = torch.where(mask, x, torch.zeros_like(x))[..., cols]
        y = y + (outliers.double() @ w.double().t()).float()
    return y


def log_linear(levels: torch.Tensor, w_int: torch.Tensor, w_zero: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """sum_k level_k (w' - wz) ws + b for log-coded inputs (fc2 after Shift-Log2), as vitq::log_linear.

    level_k (w' - wz) is exact in double and so is, but for ~1e-16, their sum: the kernel
    sums the integer weights per code and scales each code's sum by its level once.
    """
    y = (levels.double() @ (w_int.double() - w_zero.double()[:, None]).t()).float() * w_scale
    return y if bias is None else y + bias


def _centered(x: torch.Tensor, params: tuple) -> torch.Tensor:
    s, z, lo, hi = params
    return uniform_codes(x, torch.tensor(s, dtype=torch.float32), z, lo, hi) - z


def _f32(value: float) -> float:
    return float(torch.tensor(value, dtype=torch.float32))


def _score_factor(scale: float, q_params: tuple, k_params: tuple) -> float:
    """q_scale * k_scale * scale as the kernel forms it: in double, rounded once to float32."""
    return _f32(_f32(q_params[0]) * _f32(k_params[0]) * scale)


# A.V on log probability codes sums integer levels: L(code) = round(2^P * 2^(-code / k)), held in int16,
# so P <= 14; smaller where T * max|cv - zv| * 2^P would leave int32.
MAX_LEVEL_BITS = 14
_INT32_MAX = 2**31 - 1


def level_bits(tokens: int, v_max_abs: int) -> int:
    """P of the integer probability levels: the largest P <= MAX_LEVEL_BITS with tokens * v_max_abs * 2^P
    within int32 (every A.V sum then is, whatever the probabilities); -1 where even P = 0 is not."""
    bound = max(tokens * v_max_abs, 1)
    p = MAX_LEVEL_BITS
    while p >= 0 and bound << p > _INT32_MAX:
        p -= 1
    return p


def integer_levels(codes: torch.Tensor, bits: int, steps_per_octave: int, p_bits: int) -> torch.Tensor:
    """round(2^P * 2^(-code / k)) of log codes (the float32 level times 2^P, exact; half to even), 0 for the
    zero code: integers held in a float tensor."""
    return torch.round(log_values(codes, 2.0**p_bits, bits, steps_per_octave))


# log2(e) in double: the log probability codes' factor (op_attention.cpp: kLog2e).
LOG2E_F64 = float.fromhex("0x1.71547652b82fep+0")


def integer_log_attention(dots: torch.Tensor, cv: torch.Tensor, alpha: float, v_scale: float, bits: int,
                          steps_per_octave: int, p_bits: int) -> torch.Tensor:
    """softmax(alpha dots) (cv) on log probability codes, in integers but for one product per score and
    one division per row. dots: the exact integer q.k sums (float64) [.., T, T]; cv: v codes - zero.

    Per row, with m its largest dot product: the code u_j = min(round(f32(m - dot_j) * a), Z) with
    a = f32(k log2(e) alpha), Z the zero code, is round(-k log2(p_j / p_max)) of the softmax
    probability p_j but for a's rounding: the probabilities' log codes on the ladder below the row's
    largest one, not below a calibrated delta (so none clips, and a row's small probabilities keep
    their levels whatever its largest is). Their integer levels L_j (`integer_levels`) weigh the
    v rows, and the row's sum of levels normalizes exactly:
        out = f32(sum_j L_j cv_j) * f32(v_scale / sum_j L_j).
    Replaces the float softmax, its exponentials and the division per probability; chosen on the
    validation split (docs/validation/integer-log-softmax-*.md).
    """
    m = dots.amax(-1, keepdim=True)
    y = (m - dots).float() * _f32(steps_per_octave * LOG2E_F64 * alpha)
    codes = torch.round(y).clamp_(max=log_zero_code(bits))
    levels = integer_levels(codes, bits, steps_per_octave, p_bits).double()
    # Integer products, sums within int32 (level_bits): exact in double, whatever the order.
    return (levels @ cv.double()).float() * (v_scale / levels.sum(-1, keepdim=True)).float()


# Uniform probability codes from the integer dot products: the softmax's exponentials exp(-alpha (m - dot))
# = 2^-y, y = log2(e) alpha (m - dot) >= 0, in steps of 1/256 octave, as integers: 2^20 2^(-Y/256) ~
# exp2_fixed(Y), a cubic in integers on the step within the octave (relative error < 7.5e-5), shifted right
# by the octaves (0 from 20 octaves below the row's largest on).
SOFTMAX_EXP_STEPS = 256
SOFTMAX_EXP_CAP = 20 * SOFTMAX_EXP_STEPS
_EXP2_CUBIC = (1048500, -724617, 241328, -40966)  # c0 .. c3 (fitted to 2^20 2^(-f/256) on f = 0 .. 255)


def exp2_fixed(y: torch.Tensor) -> torch.Tensor:
    """E(Y) = P(Y mod 256) >> (Y div 256), P(f) = c0 + (f (c1 + (f (c2 + (f c3 >> 8)) >> 8)) >> 8)
    (shifts floor): ~2^20 2^(-Y/256) for integers 0 <= Y <= SOFTMAX_EXP_CAP, in int32 (every step
    stays below 2^28 in magnitude; torch shifts int32 ten times faster than int64)."""
    y = y.to(torch.int32)
    f, octaves = y & (SOFTMAX_EXP_STEPS - 1), y >> 8
    p = torch.full_like(y, _EXP2_CUBIC[3])
    for c in _EXP2_CUBIC[2::-1]:
        p = c + ((p * f) >> 8)
    return p >> octaves


def integer_softmax_codes(dots: torch.Tensor, alpha: float, p_params: tuple) -> torch.Tensor:
    """Uniform codes of softmax(alpha dots) over the last dimension, in integers but for one product per
    score and per code and one division per row. dots: the exact integer q.k sums (float64).

    Per row, with m its largest dot product: Y_j = min(round(f32(m - dot_j) * f32(256 log2(e) alpha)), cap),
    E_j = exp2_fixed(Y_j), and the code of the probability E_j / sum E:
        c_j = clamp(round(f32(E_j) * f32(1 / (sum_j E_j * p_scale))) + p_zero, qmin, qmax).
    Replaces the float softmax (its exponentials, the sum in double, a division per code); chosen on
    the validation split (docs/validation/integer-softmax-*.md).
    """
    s, z, qmin, qmax = p_params
    m = dots.amax(-1, keepdim=True)
    y = torch.round((m - dots).float() * _f32(SOFTMAX_EXP_STEPS * LOG2E_F64 * alpha)).clamp_(max=SOFTMAX_EXP_CAP)
    e = exp2_fixed(y)
    factor = (1.0 / (e.sum(-1, keepdim=True, dtype=torch.int64).double() * _f32(s))).float()
    return torch.clamp(torch.round(e.float() * factor) + z, qmin, qmax)


def integer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      q_params: tuple, k_params: tuple, v_params: tuple, p_uniform: tuple | None,
                      p_log: tuple | None) -> torch.Tensor:
    """softmax(q k^T * scale) v on codes, as the vitq::attention kernel computes it: [B, H, T, D] in and out.

    *_params = (scale, zero, qmin, qmax) of per-tensor uniform quantizers (floats / ints);
    probabilities are coded by p_uniform (same form): `integer_softmax_codes`, A.V as an exact
    integer sum times f32(p_scale * v_scale); or by p_log = (delta, bits, steps_per_octave):
    `integer_log_attention` (delta calibrates the float model's log quantizer; the integer codes
    take the row's largest probability instead). Both need scale > 0.
    """
    if not scale > 0:
        raise ValueError("integer attention needs scale > 0")
    cv = _centered(v, v_params)
    dots = integer_matmul(_centered(q, q_params), _centered(k, k_params).transpose(-2, -1), torch.float64)
    alpha = _score_factor(scale, q_params, k_params)
    if p_uniform is not None:
        codes = integer_softmax_codes(dots, alpha, p_uniform)
        return integer_matmul(codes - p_uniform[1], cv) * _f32(_f32(p_uniform[0]) * _f32(v_params[0]))
    _, bits, steps = p_log
    _, v_zero, v_qmin, v_qmax = v_params
    p_bits = level_bits(k.shape[-2], max(abs(v_qmin - v_zero), abs(v_qmax - v_zero)))
    if p_bits < 0:
        raise ValueError("log probability codes need tokens * max|cv - zv| within int32")
    return integer_log_attention(dots, cv, alpha, _f32(v_params[0]), bits, steps, p_bits)
