"""The quantizers' arithmetic (property tests), the recipes' algorithms, and each recipe end to end."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import vitq_edge  # noqa: F401  (torchvision shim before timm)
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from vitq_edge.errors import VitqError
from vitq_edge.quant import arith, liu2021, quantize, recipe_config, vit
from vitq_edge.quant.liu2021 import IntervalSearch
from vitq_edge.quant.losses import attention_kl, attention_kl_target, ranking_loss
from vitq_edge.quant.mixed_precision import pareto_choice
from vitq_edge.quant.quantizers import (
    LogQuantizer,
    PerPatchOutlierQuantizer,
    Quantizer,
    ShiftLog2Quantizer,
    UniformQuantizer,
)
from vitq_edge.runtime import ARITHMETIC_VERSION, KERNELS_VERSION

from .conftest import assert_user_error, invoke_cli, run_cli

FLOATS = st.floats(-50, 50, allow_nan=False, width=32)
BITS = st.integers(2, 8)


def tensors(min_side: int = 1, max_side: int = 12, elements=FLOATS):
    shape = st.tuples(st.integers(min_side, max_side), st.integers(min_side, max_side))
    return arrays(np.float32, shape, elements=elements).map(torch.from_numpy)


# ---- uniform ------------------------------------------------------------------------

@given(x=tensors(), bits=BITS, signed=st.booleans(), granularity=st.sampled_from(["tensor", "channel", "token"]))
def test_uniform_codes_in_range_and_idempotent(x, bits, signed, granularity):
    q = UniformQuantizer(bits, signed=signed, granularity=granularity)
    q.init_range(x)
    codes = q.codes(x)
    qmin, qmax = q.qrange
    assert codes.min() >= qmin and codes.max() <= qmax
    assert torch.equal(codes, codes.round())
    once = q(x)
    assert torch.isfinite(once).all()
    assert torch.equal(q(once), once)  # dequantize(quantize(.)) is a projection


@given(x=tensors(), bits=BITS, signed=st.booleans(), k=st.integers(-6, 6))
def test_uniform_scale_invariance(x, bits, signed, k):
    """Scaling the input and the scale by 2^k gives the same codes (and scaled values)."""
    q = UniformQuantizer(bits, signed=signed)
    q.init_range(x)
    qmin, qmax = q.qrange
    c = 2.0**k
    codes = arith.uniform_codes(x, q.scale, q.zero_point, qmin, qmax)
    assert torch.equal(arith.uniform_codes(x * c, q.scale * c, q.zero_point, qmin, qmax), codes)
    assert torch.equal(arith.fake_uniform(x * c, q.scale * c, q.zero_point, qmin, qmax), q(x) * c)


@given(x=tensors(min_side=2), bits=BITS)
def test_minmax_range_error_is_at_most_half_a_step_per_group(x, bits):
    for granularity in ("tensor", "channel", "token"):
        q = UniformQuantizer(bits, signed=False, granularity=granularity)
        q.init_range(x)
        assert ((q(x) - x).abs() <= q.scale / 2 + 1e-5 * x.abs().max() + 1e-6).all()


@pytest.mark.parametrize("make", [
    lambda: UniformQuantizer(4, signed=True), lambda: UniformQuantizer(4, signed=False, granularity="token"),
    lambda: UniformQuantizer(4, granularity="channel", init="mse"), lambda: LogQuantizer(4, steps_per_octave=2),
    lambda: PerPatchOutlierQuantizer(4, threshold=5.0), lambda: ShiftLog2Quantizer(4, steps_per_octave=2),
    lambda: UniformQuantizer(4, signed=False, init="mse"),
])
@pytest.mark.parametrize("value", [0.0, 3.25, -0.5])
def test_constant_and_zero_tensors_stay_finite(make, value):
    x = torch.full((3, 5, 8), value)
    q = make()
    q.init_range(x.abs() if isinstance(q, LogQuantizer) else x)
    out = q(x.abs() if isinstance(q, LogQuantizer) else x)
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p).all() for p in q.parameters())


# ---- log2 / log-sqrt2 -----------------------------------------------------------------

# Zero or at least 2^-60: x * 2^shift must not underflow (a value that becomes 0 takes the zero code),
# and x / delta stays above arith.log_codes' ratio floor.
@given(x=tensors(elements=st.one_of(st.just(0.0), st.floats(2.0**-60, 1, width=32))), bits=st.integers(3, 8),
       k=st.sampled_from([1, 2]), shift=st.integers(-4, 4))
def test_log_codes_range_idempotence_and_scale_invariance(x, bits, k, shift):
    q = LogQuantizer(bits, steps_per_octave=k)
    q.init_range(x)
    codes = q.codes(x)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    assert (codes[x == 0] == arith.log_zero_code(bits)).all()
    once = q(x)
    assert (once <= q.delta + 1e-7).all() and (once >= 0).all()
    assert torch.equal(q(once), once)
    c = 2.0**shift  # multiplying by 2 moves every value k codes up the ladder
    assert torch.equal(arith.log_codes(x * c, q.delta * c, bits, k), arith.log_codes(x, q.delta, bits, k))


@given(x=tensors(elements=st.one_of(st.just(0.0), st.floats(-1, 4, width=32), st.floats(0, 2.0**-100, width=32))),
       bits=st.integers(2, 8), k=st.sampled_from([1, 2, 4, 32]))
@settings(deadline=None)  # the first example of each (bits, k) builds its ladder
def test_fake_log_without_gradient_is_the_values_of_the_codes(x, bits, k):
    """fake_log's direct table lookup gives values(codes(x)): below, on and above the ladder, at zero and below it."""
    delta = torch.tensor(0.75)
    want = arith.log_values(arith.log_codes(x, delta, bits, k), delta, bits, k)
    assert torch.equal(arith.fake_log(x, delta, bits, k), want)


def test_log_codes_are_exact_down_to_the_smallest_normal_ratio():
    # x / delta = 2^-122.4: a normal float, far below any level the 4-bit ladders reach, inside the
    # 8-bit log2 ladder (254 levels); it gets its own exact code, not the floor's.
    x, delta = torch.tensor([1.4013e-45]), torch.tensor(1e-8)
    assert int(arith.log_codes(x, delta, 8, 1)) == 122
    assert int(arith.log_codes(x, delta, 7, 1)) == 122 and int(arith.log_codes(x, delta, 6, 1)) == 63  # zero code
    # Subnormal ratios take the floor's code (2^-126), or zero where the ladder ends first.
    assert int(arith.log_codes(torch.tensor([1e-45]), torch.tensor(1.0), 8, 1)) == 126


def test_log_sqrt2_is_finer_than_log2_on_softmax():
    probs = torch.randn(64, 3, 17, 17).softmax(-1)
    errs = {}
    for k in (1, 2):
        q = LogQuantizer(4, steps_per_octave=k)
        q.init_range(probs)
        errs[k] = float((q(probs) - probs).pow(2).mean())
    assert errs[2] < errs[1]


def test_log_codes_are_the_exactly_rounded_log2():
    """The threshold count equals round(-k log2(x / delta)) computed in double, on every kind of value."""
    x = torch.cat([torch.rand(20000) * 2, torch.exp2(-torch.arange(0, 30, 0.25)), torch.tensor([0.0, -1.0])])
    for k in (1, 2, 3, 8):
        codes = arith.log_codes(x, torch.tensor(0.7), 8, k)
        ratio = torch.clamp(x.double() / float(torch.tensor(0.7)), min=1e-30)
        rounded = torch.round(-k * torch.log2(ratio))
        want = torch.where((rounded > 254) | (x <= 0), 255.0, torch.clamp(rounded, 0, 254))
        assert torch.equal(codes.double(), want), k
    # Boundaries and their neighbours: the one-search coding places each exactly.
    for bits, k in ((4, 1), (4, 2), (8, 1), (8, 2), (6, 3)):
        b, _, _ = arith._log_ladder(bits, k)
        x = torch.cat([b, torch.nextafter(b, torch.tensor(0.0)), torch.nextafter(b, torch.tensor(9.0))])
        rounded = torch.round(-k * torch.log2(x.double().clamp(min=arith.LOG_RATIO_FLOOR)))
        zero = 2**bits - 1
        want = torch.where(rounded > zero - 1, float(zero), torch.clamp(rounded, 0, zero - 1))
        assert torch.equal(arith.log_codes(x, torch.tensor(1.0), bits, k).double(), want), (bits, k)


def test_level_bits_keep_every_attention_sum_within_int32():
    """P is the largest (at most 14) with tokens * max|cv - zv| * 2^P in int32: 14 for ViT-S/14 at 224
    px with 8-bit v codes, fewer for more tokens or wider codes."""
    assert arith.level_bits(257, 255) == 14 and arith.level_bits(577, 255) == 13
    for tokens, v in ((1, 1), (257, 255), (577, 255), (1370, 255), (17, 32767), (2**20, 2**11)):
        p = arith.level_bits(tokens, v)
        assert tokens * v * 2**p <= 2**31 - 1
        assert p == arith.MAX_LEVEL_BITS or tokens * v * 2 ** (p + 1) > 2**31 - 1
    assert arith.level_bits(2**31, 1) == -1


def test_integer_levels_round_the_log_levels_to_2_to_the_minus_p():
    """L = round(2^P level): within 1/2 of 2^P level, half to even on ties, 0 for the zero code."""
    for bits, k in ((8, 16), (8, 32), (6, 4), (4, 1)):
        codes = torch.arange(2**bits, dtype=torch.float32)
        levels = arith.log_values(codes, 1.0, bits, k).double()
        for p in (14, 11):
            fixed = arith.integer_levels(codes, bits, k, p)
            assert torch.equal(fixed, torch.round(fixed)) and float(fixed[-1]) == 0.0
            assert float((fixed.double() - levels * 2**p).abs().max()) <= 0.5
    # 2^-15 * 2^14 = 0.5: a tie, to even (0); 2^-14 * 2^14 = 1 stays
    assert float(arith.integer_levels(torch.tensor(240.0), 8, 16, 14)) == 0.0
    assert float(arith.integer_levels(torch.tensor(224.0), 8, 16, 14)) == 1.0


@pytest.mark.parametrize("round_gradient", [True, False])
def test_fake_log_gradient_is_the_straight_through_one_of_the_continuous_log(round_gradient):
    """fake_log's written-out backward equals autograd through the straight-through construction."""
    x0 = torch.cat([torch.rand(3000) * 1.6, torch.tensor([0.0, 1e-9])])  # above the top level, on it, below it
    g = torch.randn_like(x0)
    bits, k = 4, 2

    x, delta = x0.clone().requires_grad_(), torch.tensor(0.9, requires_grad=True)
    (arith.fake_log(x, delta, bits, k, round_gradient) * g).sum().backward()

    xr, dr = x0.clone().requires_grad_(), torch.tensor(0.9, requires_grad=True)
    ratio = xr / dr if round_gradient else (xr / dr).detach()
    continuous = -k * torch.log2(ratio.clamp(min=arith.LOG_RATIO_FLOOR))
    q = torch.round(continuous.detach().double()).float()  # unclamped: negative above the top level
    if round_gradient:
        q = continuous + (q - continuous).detach()
    zero = arith.log_zero_code(bits)
    below = (q.detach() > zero - 1) | (x0 <= 0)
    codes = torch.where(below, torch.full_like(x0, zero), torch.clamp(q, 0, zero - 1))
    assert torch.equal(codes.detach(), arith.log_codes(x0, torch.tensor(0.9), bits, k))
    ref = torch.where(codes == zero, torch.zeros_like(x0), dr * torch.exp2(-codes.double() / k).float())
    (ref * g).sum().backward()

    if round_gradient:
        assert torch.allclose(x.grad, xr.grad, rtol=1e-5, atol=1e-6)
    else:
        assert x.grad is None and xr.grad is None
    assert torch.allclose(delta.grad, dr.grad, rtol=1e-4, atol=1e-3)


# ---- the float steps the kernels share -------------------------------------------------

def test_float_steps_approximate_the_true_functions():
    """exp, GELU, LayerNorm, softmax of arith (what the kernels compute bit for bit) against torch in double."""
    x = torch.linspace(-87, 0, 200001)
    exact = torch.exp(x.double())
    assert float(((arith.exp_nonpositive(x).double() - exact) / exact).abs().max()) < 2e-7
    assert torch.equal(arith.exp_nonpositive(torch.tensor([-88.0, -1e4])), torch.zeros(2))
    x = torch.linspace(-12, 12, 200001)
    err = (arith.gelu(x).double() - torch.nn.functional.gelu(x.double())).abs()
    assert float((err / x.abs().double().clamp(min=1e-3)).max()) < 4e-7
    assert float(arith.gelu(torch.tensor([-0.7517916]))) == pytest.approx(-0.169971, abs=1e-6)  # GELU's minimum
    x, w, b = torch.randn(7, 192) * 5 + 3, torch.randn(192), torch.randn(192)
    want = torch.nn.functional.layer_norm(x.double(), (192,), w.double(), b.double(), 1e-6)
    assert float((arith.layer_norm(x, w, b, 1e-6).double() - want).abs().max()) < 1e-5  # float32 steps


def test_integer_softmax_codes_are_the_softmax_codes_within_one():
    """arith.exp2_fixed: within 7.5e-5 of 2^20 2^(-y/256) but for the floor of its shift (< 1), never
    increasing, 0 at the cap; integer_softmax_codes: a probability's code within one of round(p / p_scale)
    of the float softmax, and the same as it for nearly every score."""
    y = torch.arange(arith.SOFTMAX_EXP_CAP + 1)
    e = arith.exp2_fixed(y)
    exact = 2.0**20 * torch.exp2(-y.double() / arith.SOFTMAX_EXP_STEPS)
    assert bool(((e.double() - exact).abs() < 7.5e-5 * exact + 1).all())
    assert bool((e[1:] <= e[:-1]).all()) and int(e[-1]) == 0 and int(e[0]) < 2**20
    dots = torch.randint(-3000, 3000, (4, 64, 197)).double()
    alpha, p_scale = 0.004, 1 / 255
    codes = arith.integer_softmax_codes(dots, alpha, (p_scale, 0, 0, 255))
    want = torch.clamp(torch.round((dots * alpha).softmax(-1) / p_scale), 0, 255)
    assert float((codes - want).abs().max()) <= 1 and float((codes != want).double().mean()) < 0.01


def test_gelu_table_is_gelu_on_its_grid_and_x_above_it():
    """arith.gelu_table, the integer programs' GELU: arith.gelu at the nearest grid point (ties to the
    even one), x itself from 127.5 / 32 up, gelu(-4) below the grid, a NaN as gelu(0) = 0."""
    grid = (torch.arange(256) - 128).float() / 32
    assert torch.equal(arith.gelu_table(grid), arith.gelu(grid))
    x = torch.linspace(-12, 12, 200001)
    err = (arith.gelu_table(x).double() - torch.nn.functional.gelu(x.double())).abs()
    assert 0.015 < float(err.max()) < 0.018  # half a step of 1/32 times GELU's largest slope, 1.13
    ties = torch.tensor([1.5, 2.5, -1.5, -2.5]) / 32
    assert torch.equal(arith.gelu_table(ties), arith.gelu(torch.tensor([2.0, 2.0, -2.0, -2.0]) / 32))
    top = torch.tensor(127.5 / 32)
    below_top = torch.nextafter(top, torch.tensor(0.0))
    assert float(arith.gelu_table(top)) == float(top)
    assert float(arith.gelu_table(below_top)) == float(arith.gelu(torch.tensor(127 / 32)))
    edges = arith.gelu_table(torch.tensor([-4.015625, -1e30, -math.inf, math.inf, math.nan]))
    gelu_low = float(arith.gelu(torch.tensor(-4.0)))
    assert edges.tolist() == [gelu_low, gelu_low, gelu_low, math.inf, 0.0]


# ---- PPOQ -----------------------------------------------------------------------------

@given(x=arrays(np.float32, (3, 5, 16), elements=st.floats(-20, 20, width=32)).map(torch.from_numpy),
       bits=st.integers(3, 8), threshold=st.floats(0.5, 10))
def test_ppoq_restores_outliers_exactly_and_counts_them(x, bits, threshold):
    q = PerPatchOutlierQuantizer(bits, threshold=threshold, init="minmax")
    q.init_range(x)
    mask = x.abs() > threshold
    out = q(x)
    assert torch.equal(out[mask], x[mask])
    assert q.outlier_fraction == pytest.approx(float(mask.float().mean()))
    assert q.scale.shape == (5, 1)  # one scale per token position
    inliers = ~mask
    step = q.scale.expand_as(x[0]).expand_as(x)
    assert ((out - x).abs()[inliers] <= step[inliers] / 2 + 1e-5).all()


def test_ppoq_beats_per_tensor_on_a_token_with_a_large_range():
    torch.manual_seed(0)
    x = torch.randn(32, 17, 64) * 0.5
    x[:, 0] *= 20  # the class token spans a much wider range, as after LayerNorm in ViTs
    per_tensor = UniformQuantizer(4, signed=False)
    per_tensor.init_range(x)
    ppoq = PerPatchOutlierQuantizer(4, threshold=100.0, init="minmax")
    ppoq.init_range(x)
    assert (ppoq(x) - x).pow(2).mean() < 0.5 * (per_tensor(x) - x).pow(2).mean()


def test_outlier_correction_over_the_outlier_channels_equals_the_dense_one():
    """quantized_linear adds x * W over the input channels that hold an outlier only: the same floats as
    the whole outlier matrix (zeros elsewhere) through one double GEMM, rounded once."""
    torch.manual_seed(0)
    x = torch.randn(2, 9, 48)
    x[:, :, [3, 17, 40]] *= 30  # outlier channels, as after real ViTs' LayerNorms
    x[1, 4, 25] = -12.0  # and one lone outlier
    w_int = torch.randint(-127, 128, (20, 48)).float()
    w_scale, w_zero, bias = torch.rand(20) / 50, torch.zeros(20), torch.randn(20)
    scale, zero, threshold = torch.rand(9, 1) / 10 + 0.01, torch.full((9, 1), 128.0), 5.0
    mask = x.abs() > threshold
    inliers = torch.where(mask, torch.zeros_like(x), x)
    dense = arith.integer_linear(arith.uniform_codes(inliers, scale, zero, 0, 255), zero, scale, w_int, w_zero,
                                 w_scale, bias)
    outliers = torch.where(mask, x, torch.zeros_like(x))
    dense = dense + (outliers.double() @ (w_int * w_scale[:, None]).double().t()).float()
    out = arith.quantized_linear(x, scale, zero, 0, 255, threshold, w_int, w_zero, w_scale, bias)
    assert 0 < int(mask.sum()) and torch.equal(out, dense)


@pytest.mark.parametrize("make", [lambda: PerPatchOutlierQuantizer(4, threshold=2.0, init="minmax"),
                                  lambda: ShiftLog2Quantizer(4, steps_per_octave=2)])
def test_round_gradient_off_keeps_values_and_learns_the_scale_through_dequantization_only(make):
    """adfq's round_gradient="none" (the ADFQ-ViT code): same values; the input gets no gradient and the
    scale only d(value)/d(scale) at fixed codes, where the straight-through rounding also passes x/scale."""
    torch.manual_seed(0)
    x = torch.nn.functional.gelu(torch.randn(2, 5, 16) * 2)
    outs, grads = {}, {}
    for ste in (True, False):
        q = make()
        q.init_range(x)
        q.round_gradient = ste
        scale = q.scale if isinstance(q, UniformQuantizer) else q.delta
        scale.requires_grad_(True)
        xi = x.clone().requires_grad_(True)
        out = q(xi)
        out.sum().backward()
        outs[ste], grads[ste] = out.detach(), (xi.grad, scale.grad.clone())
        if not ste:
            with torch.no_grad():  # d(sum of values)/d(scale) at fixed codes = sum of quantized values / scale
                if isinstance(q, ShiftLog2Quantizer):
                    expected = (q(x) + q.shift).sum() / scale
                else:  # per token position; outliers pass unquantized
                    values = torch.where(x.abs() > q.threshold, 0.0, q(x))
                    expected = values.sum((0, 2)).reshape(scale.shape) / scale
            torch.testing.assert_close(grads[ste][1], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(outs[True], outs[False])
    assert grads[False][0] is None or not grads[False][0].any()
    assert grads[True][0].abs().sum() > 0 and not torch.allclose(grads[True][1], grads[False][1])


# ---- Shift-Log2 -----------------------------------------------------------------------

def test_shift_log2_handles_gelu_minimum_and_zeros_and_folds_into_the_bias():
    gelu = torch.nn.GELU()
    x = gelu(torch.linspace(-6, 6, 4001)).reshape(1, 1, -1)
    assert float(x.min()) == pytest.approx(ShiftLog2Quantizer.GELU_MIN, abs=1e-4)
    for k in (1, 2):
        q = ShiftLog2Quantizer(6, steps_per_octave=k)
        q.init_range(x)
        out = q(x)
        assert torch.isfinite(out).all()
        at_min = int(x.argmin())
        assert abs(float(out.flatten()[at_min] - x.flatten()[at_min])) < 0.01  # the densest levels sit there
        zeros = q(torch.zeros(2, 3, 8))
        assert torch.isfinite(zeros).all() and zeros.abs().max() < 0.05
    # fc2 consumes the shifted codes with -shift * W @ 1 in its bias: same result as un-shifting first.
    linear = torch.nn.Linear(x.shape[-1], 7)
    op = vit.QuantLinear(linear, UniformQuantizer(8, granularity="channel"), q)
    op.weight_quant.init_range(op.weight)
    folded = op(x)
    unshifted = torch.nn.functional.linear(q(x), op.quantized_weight(), op.bias)
    assert torch.allclose(folded, unshifted, atol=1e-4)


# ---- Liu et al.: ranking loss, bias correction, mixed precision -------------------------

@given(ref=arrays(np.float32, (2, 3, 9), elements=st.integers(-400, 400).map(lambda v: v / 8),
                  unique=True).map(torch.from_numpy),
       a=st.floats(0.1, 4), b=st.floats(-3, 3))
def test_ranking_loss_is_zero_exactly_when_every_pair_keeps_its_order(ref, a, b):
    kept = ref * a + b  # any increasing map keeps every order
    assert float(ranking_loss(kept, ref, theta=0.2)) == 0.0
    swapped = kept.clone()
    i, j = int(ref[0, 0].argmax()), int(ref[0, 0].argmin())
    swapped[0, 0, i], swapped[0, 0, j] = kept[0, 0, j], kept[0, 0, i]
    assert float(ranking_loss(swapped, ref, theta=0.2)) >= 0.2 / (9 * 8 / 2) / 6


def test_attention_kl_is_zero_for_equal_maps_and_positive_otherwise():
    p = torch.randn(2, 3, 5, 5).softmax(-1)
    assert float(attention_kl(p, attention_kl_target(p))) == pytest.approx(0.0, abs=1e-7)
    q = p.flip(-1)
    kl = float(attention_kl(q, attention_kl_target(p, 4.0, -1), 4.0, -1))
    pt, qt = (p / 4).softmax(-1).double(), (q / 4).softmax(-1).double()
    assert kl > 0 and kl == pytest.approx(float((pt * (pt / qt).log()).sum(-1).mean()), rel=1e-4)


def test_bias_correction_removes_a_known_constant_output_error():
    torch.manual_seed(0)
    scale = 0.1
    grid = torch.randint(-60, 60, (64, 17, 16)).float() * scale
    x = grid + 0.3 * scale  # every input rounds down by exactly 0.3 steps: a constant error
    linear = torch.nn.Linear(16, 8)
    iq = UniformQuantizer(8, signed=True)
    iq.set_params(torch.tensor(scale), torch.tensor(0.0))
    wq = UniformQuantizer(8, signed=True)
    wq.init_range(linear.weight.detach())
    op = vit.QuantLinear(linear, wq, iq)
    expected_error = -0.3 * scale * op.quantized_weight().sum(1)
    before = (op(x) - torch.nn.functional.linear(x, op.weight, op.bias)).mean((0, 1))
    assert torch.allclose(before, expected_error, atol=0.02)
    cfg = recipe_config("liu2021", "W8A8", candidates=1, alpha=1.0, beta=1.0, rounds=1, search_tokens=0)
    search = IntervalSearch(op, (x,), cfg)
    search.run()
    after = (op(x) - search.reference).mean((0, 1))
    assert after.abs().max() < 1e-4 < before.abs().max()


def test_interval_search_starts_below_the_max_only_for_quantizers_narrower_than_8_bits():
    torch.manual_seed(0)
    x = torch.randn(4, 9, 16)
    linear = torch.nn.Linear(16, 8)

    def searched(**options) -> list[float]:
        iq, wq = UniformQuantizer(4, signed=True), UniformQuantizer(8, signed=True)
        iq.init_range(x)
        wq.init_range(linear.weight.detach())
        d0 = [float(iq.scale), float(wq.scale)]  # the order of IntervalSearch's scales: input, weight
        op = vit.QuantLinear(linear, wq, iq)
        # one candidate: the grid's lower end, so the searched interval is alpha x the max
        cfg = recipe_config("liu2021", "W8A8", candidates=1, rounds=1, search_tokens=0, bias_correction=False,
                            **options)
        s_input, s_weight = IntervalSearch(op, (x,), cfg).run()["scales"]
        return [s_weight / d0[1], s_input / d0[0]]

    assert searched() == pytest.approx([1.0, 0.5])  # 8-bit weights at alpha_8bit, 4-bit input at alpha
    assert searched(alpha_8bit=0.5) == pytest.approx([0.5, 0.5])  # the paper's grid
    assert searched(alpha=0.3, alpha_8bit=0.9) == pytest.approx([0.9, 0.3])


@given(peak=st.integers(0, 99), n=st.integers(1, 100))
def test_coarse_to_fine_search_finds_the_peak_of_a_unimodal_objective(peak, n):
    peak = min(peak, n - 1)
    calls = []

    def score(i: int) -> float:
        calls.append(i)
        return -abs(i - peak)

    assert liu2021._best(score, n, coarse=True) == (peak, 0)
    assert len(set(calls)) <= max(16, 3 * round(n ** 0.5) + 1)
    assert liu2021._best(score, n, coarse=False) == (peak, 0)


def test_search_samples_token_rows_of_linears_convolutions_and_attention():
    x = torch.randn(4, 50, 8)
    linear = vit.QuantLinear(torch.nn.Linear(8, 3), UniformQuantizer(8, signed=True), UniformQuantizer(8, signed=True))
    sx, w = liu2021.search_operands(linear, (x,), tokens=16)
    assert sx.shape == (4, 16, 8) and torch.equal(w, linear.weight)
    assert all(any(torch.equal(row, full) for full in x[0]) for row in sx[0])  # whole rows, same ones per image
    assert liu2021.search_operands(linear, (x,), tokens=0)[0] is x
    conv = vit.QuantConv2d(torch.nn.Conv2d(3, 5, 4, stride=4), UniformQuantizer(8, signed=True),
                           UniformQuantizer(8, signed=True))
    img = torch.randn(2, 3, 16, 16)
    patches, w2 = liu2021.search_operands(conv, (img,), tokens=0)
    assert torch.allclose(torch.nn.functional.linear(patches, w2, conv.bias).transpose(1, 2).reshape(2, 5, 4, 4),
                          torch.nn.functional.conv2d(img, conv.weight, conv.bias, stride=4), atol=1e-5)
    q, kt = torch.randn(2, 3, 40, 8), torch.randn(2, 3, 8, 40)
    a, b = liu2021.search_operands(vit.QuantMatMul(UniformQuantizer(8), UniformQuantizer(8)), (q, kt), tokens=10)
    assert a.shape == (2, 3, 10, 8) and b is kt


def test_per_kind_normalisation_stops_one_kind_taking_every_low_width():
    """Attention-map sensitivities are orders of magnitude below MLP-output ones: in a raw sum every
    MSA module drops to the lowest width; normalised per kind, the widths follow relative sensitivity."""
    from vitq_edge.quant.mixed_precision import normalise_per_kind

    omegas = {"blocks.0.attn": {4: 4e-6, 6: 1e-6, 8: 0.2e-6}, "blocks.1.attn": {4: 40e-6, 6: 10e-6, 8: 2e-6},
              "blocks.0.mlp": {4: 40.0, 6: 10.0, 8: 2.0}, "blocks.1.mlp": {4: 4.0, 6: 1.0, 8: 0.2}}
    costs = dict.fromkeys(omegas, 100)
    raw = pareto_choice(costs, omegas, 6 * 400)
    assert raw["blocks.0.attn"] == raw["blocks.1.attn"] == 4
    normalised = normalise_per_kind(omegas, 6)
    assert sum(normalised[m][6] for m in ("blocks.0.attn", "blocks.1.attn")) == pytest.approx(2.0)
    chosen = pareto_choice(costs, normalised, 6 * 400)
    assert chosen["blocks.1.attn"] > chosen["blocks.0.attn"] and chosen["blocks.0.mlp"] > chosen["blocks.1.mlp"]


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_mixed_precision_choice_respects_the_budget_and_is_optimal(data):
    modules = [f"m{i}" for i in range(data.draw(st.integers(1, 5)))]
    costs = {m: data.draw(st.integers(1, 5)) for m in modules}
    widths = [4, 5, 6, 7, 8]
    omegas = {m: {b: data.draw(st.floats(0, 100)) for b in widths} for m in modules}
    budget = sum(costs.values()) * 6
    chosen = pareto_choice(costs, omegas, budget)
    assert sum(costs[m] * b for m, b in chosen.items()) <= budget
    best = min(sum(omegas[m][b] for m, b in zip(modules, combo, strict=True))
               for combo in itertools.product(widths, repeat=len(modules))
               if sum(costs[m] * b for m, b in zip(modules, combo, strict=True)) <= budget)
    assert sum(omegas[m][b] for m, b in chosen.items()) == pytest.approx(best)


# ---- recipes end to end on a tiny ViT -------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, in_chans=1,
                              num_classes=5, embed_dim=32, depth=2, num_heads=2).eval()
    x = torch.randn(96, 1, 16, 16)
    with torch.no_grad():
        y = model(x)
    return model, x, y


def _sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum()))


def _liu_mixed_search_state(tiny):
    from vitq_edge.quant.liu2021 import liu_factory, search_intervals
    from vitq_edge.quant.mixed_precision import float_block_inputs, module_search

    model, x, _ = tiny
    qmodel = vit.quantize_vit(model, liu_factory(lambda op: (4, 4)))
    vit.calibrate_activations(qmodel, [x])
    vit.set_enabled(qmodel, False)
    reference = vit.quantize_vit(model, liu_factory(lambda op: (4, 4)))
    vit.set_enabled(reference, False)
    block_inputs = float_block_inputs(reference, x, 40)
    config = recipe_config("liu2021", "W4A4", candidates=9, rounds=2)

    def search(i: int):
        return module_search(qmodel, x, config, i, block_inputs[i], 40, search_intervals)

    return qmodel, reference, x, block_inputs, search


@pytest.mark.parametrize("module,output", [("blocks.1.attn", "module"), ("blocks.1.mlp", "module"),
                                           ("blocks.1.attn", "block"), ("blocks.0.mlp", "model")])
def test_mixed_precision_measures_a_module_on_its_block_alone(tiny, module, output):
    """A module's output Ŷ from its own block on the cached float block input equals the whole model's,
    with only that module quantized (the sensitivity search runs 1 block instead of the model)."""
    from vitq_edge.quant.mixed_precision import _module_output

    qmodel, _, x, block_inputs, search = _liu_mixed_search_state(tiny)
    i = int(module.split(".")[1])
    search(i)(qmodel, x, only=[n for n, _ in vit.quant_ops(qmodel) if n.startswith(module + ".")])
    if output == "block":
        target = qmodel.blocks[i]
    else:
        target = qmodel.get_submodule(f"{module}.av.a_quant" if module.endswith("attn") else module)
    hooked: list[torch.Tensor] = []
    handle = target.register_forward_hook(lambda m, args, out: hooked.append(out))
    with torch.no_grad(), vit.arithmetic("fake-quant"):
        logits = qmodel(x)
    handle.remove()
    want = logits if output == "model" else hooked[0]
    assert torch.equal(_module_output(qmodel, module, block_inputs[i], 40, output), want)


def test_mixed_precision_measures_each_module_with_only_itself_quantized(tiny):
    """The search's bias correction changes the module's biases: measuring a module leaves the model as
    it was (float biases, intervals, quantizers off), so no sensitivity depends on what was measured
    before it."""
    from vitq_edge.quant.mixed_precision import _module_output, module_error

    qmodel, reference, x, block_inputs, search = _liu_mixed_search_state(tiny)
    float_y = {m: _module_output(reference, m, block_inputs[1], 40) for m in ("blocks.1.attn", "blocks.1.mlp")}
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    alone = module_error(qmodel, "blocks.1.mlp", x, block_inputs[1], float_y["blocks.1.mlp"], search(1), 40)
    module_error(qmodel, "blocks.1.attn", x, block_inputs[1], float_y["blocks.1.attn"], search(1), 40)
    assert all(torch.equal(v, before[k]) for k, v in qmodel.state_dict().items())
    assert not any(q.enabled for _, q in vit.quantizers(qmodel))
    after = module_error(qmodel, "blocks.1.mlp", x, block_inputs[1], float_y["blocks.1.mlp"], search(1), 40)
    assert after == alone > 0


def test_mixed_precision_in_the_quantized_model_measures_the_model_with_one_module_swapped(tiny):
    """mp_output="quantized-model": a module's error at width b is the output error of the uniform N-bit model
    with that module alone at b (searched in place), though measured from cached block inputs; the model is
    restored between modules (blocks.1.mlp, measured last, sees every other module at N bits); at N every
    module reports the uniform model's own error, which a module swapped in at N and searched in place
    reproduces exactly (the stem and head keep their widths in every model: at b they moved the ranges)."""
    import copy

    from vitq_edge.quant.calibration import batches
    from vitq_edge.quant.liu2021 import liu_factory, search_intervals
    from vitq_edge.quant.mixed_precision import at_width, module_names, quantized_context_errors
    from vitq_edge.recipes import layer_bits

    model, x, y = tiny
    quick = recipe_config("liu2021", "W6A6", candidates=4, rounds=2)
    modules = module_names(model)
    errors = quantized_context_errors(model, x, quick, liu_factory, search_intervals, [4, 6, 8], y, 40)

    def uniform() -> torch.nn.Module:
        context = vit.quantize_vit(model, liu_factory(layer_bits(quick)))
        vit.calibrate_activations(context, batches(x, 40))
        search_intervals(context, x, quick, status_lines=False)
        return context

    def output_error(qmodel: torch.nn.Module) -> float:
        with torch.no_grad(), vit.arithmetic("fake-quant"):
            return float((qmodel(x) - y).pow(2).sum()) / len(x)

    def swapped(module: str, b: int) -> float:
        context, at_b = uniform(), vit.quantize_vit(model, at_width(liu_factory, quick, modules, b))
        vit.calibrate_activations(at_b, batches(x, 40))
        i, kind = int(module.split(".")[1]), module.rsplit(".", 1)[1]
        setattr(context.blocks[i], kind, copy.deepcopy(at_b.get_submodule(module)))
        search_intervals(context, x, quick, status_lines=False,
                         only=[n for n, _ in vit.quant_ops(context) if n.startswith(module + ".")])
        return output_error(context)

    at_n = output_error(uniform())
    assert at_n > 0 and all(e[6] == pytest.approx(at_n, rel=1e-5) for e in errors.values())
    assert all(swapped(m, 6) == pytest.approx(at_n, rel=1e-5) for m in modules)
    for module, b in (("blocks.0.attn", 4), ("blocks.1.mlp", 8)):
        assert errors[module][b] == pytest.approx(swapped(module, b), rel=1e-5)
        assert errors[module][b] != pytest.approx(at_n, rel=1e-3)  # the width changed the model


@pytest.mark.parametrize("walk", ["ops", "adfq units"])
def test_cached_block_inputs_equal_the_whole_models_as_quantizers_switch_on(tiny, walk):
    """liu2021 and adfq read each op's (unit's) input from per-block caches instead of rerunning the
    model's prefix: the same tensors, while the op before it has just been quantized."""
    from vitq_edge.quant.adfq import units
    from vitq_edge.quant.calibration import BlockInputs, capture_inputs
    from vitq_edge.quant.minmax import minmax_factory

    model, x, _ = tiny
    qmodel = vit.quantize_vit(model, minmax_factory(lambda op: (4, 4)))
    vit.calibrate_activations(qmodel, [x])
    vit.set_enabled(qmodel, False)
    names = [n for n, _ in vit.quant_ops(qmodel)] if walk == "ops" else units(qmodel)
    assert names[0] == "patch_embed.proj" and names[-1] == "head"
    cached = BlockInputs(qmodel, x, 40)
    for name in names:
        op = qmodel.get_submodule(name)
        got, want = cached.of(name, op), capture_inputs(qmodel, op, x, 40)
        assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want, strict=True)), name
        for q in op.modules():
            if isinstance(q, Quantizer):
                q.enabled = True  # the next op sees this one quantized, as in the recipes
    assert cached.index == len(qmodel.blocks)


@pytest.mark.parametrize("recipe,bits,options", [
    ("minmax", "W8A8", {}), ("minmax", "W4A4", {}),
    ("liu2021", "W6A6", {"candidates": 12}), ("liu2021", "mixed:6", {"candidates": 8, "mp_candidates": 4}),
    # The sensitivity variants are 1-2 min each here: the full suite runs them (slow).
    pytest.param("liu2021", "mixed:6", {"candidates": 8, "mp_candidates": 4, "mp_normalise": "kind"},
                 marks=pytest.mark.slow),
    pytest.param("liu2021", "mixed:6", {"candidates": 8, "mp_candidates": 4, "mp_output": "block"},
                 marks=pytest.mark.slow),
    pytest.param("liu2021", "mixed:6", {"candidates": 8, "mp_candidates": 4, "mp_output": "model"},
                 marks=pytest.mark.slow),
    pytest.param("liu2021", "mixed:6", {"candidates": 8, "mp_candidates": 4, "mp_output": "quantized-model"},
                 marks=pytest.mark.slow),
    pytest.param("liu2021", "mixed:6", {"candidates": 8, "mp_candidates": 4, "mp_widths": "weights"},
                 marks=pytest.mark.slow),
    ("adfq", "W4A4", {"iters": 30}), ("adfq", "W8A8", {"iters": 0}),
    ("adfq", "W4A4", {"iters": 10, "act_calibration": "sequential", "round_gradient": "none"}),
    ("adfq", "W6A6", {"iters": 0, "act_calibration": "sequential"}),
    ("minmax", "W4A4", {"head_bits": None, "stem_bits": None}),
    ("adfq", "W4A4", {"iters": 0, "head_bits": 6, "stem_bits": 5}),
])
def test_recipe_runs_end_to_end_on_a_tiny_vit(tiny, recipe, bits, options):
    model, x, y = tiny
    qm = quantize(model, recipe_config(recipe, bits, **options), [x[:48], x[48:]], (x[:1],))
    with torch.no_grad():
        out = qm.module(x)
        assert torch.equal(model(x), y)  # the float model is untouched
    assert torch.isfinite(out).all()
    assert _sqnr(y, out) > (10 if bits == "W8A8" else 3)
    assert qm.recipe == recipe and qm.bits == bits and "gelu" in qm.float_ops and "softmax" not in qm.float_ops
    float_bytes = 4 * sum(p.numel() for p in model.parameters())
    assert qm.size_bytes < float_bytes
    described = qm.details["quantizers"]
    assert "blocks.1.attn.qkv" in described and "head" in described
    # The stem at stem_bits and the head at head_bits (default 8), the rest at --bits (or a mixed module's width).
    for op, option in (("patch_embed.proj", "stem_bits"), ("head", "head_bits")):
        width = options.get(option, 8) or int(bits[1])
        assert described[op]["weight"]["bits"] == described[op]["input"]["bits"] == width
    if not bits.startswith("mixed"):
        assert described["blocks.1.mlp.fc1"]["weight"]["bits"] == int(bits[1])
    if recipe == "adfq":
        assert described["blocks.0.attn.qkv"]["input"]["kind"] == "PerPatchOutlierQuantizer"
        # log ladders (adfq.log_steps_per_octave): probabilities ~16 octaves, post-GELU ~8 (Shift-Log2 below
        # 8 bits, a uniform code at 8: adfq.gelu_quantizer)
        probs, gelu = {"W4A4": ("2", "sqrt2"), "W6A6": ("2^(1/4)", "2^(1/8)"), "W8A8": ("2^(1/16)", None)}[bits]
        assert described["blocks.0.attn.av"]["a"]["base"] == probs
        fc2_input = described["blocks.0.mlp.fc2"]["input"]
        assert fc2_input["kind"] == ("UniformQuantizer" if gelu is None else "ShiftLog2Quantizer")
        assert fc2_input.get("base") == gelu
        assert set(qm.details["outlier_fraction"]) == {f"blocks.{i}.{m}.input_quant" for i in (0, 1)
                                                       for m in ("attn.qkv", "mlp.fc1")}
    if bits.startswith("mixed"):
        mp = qm.details["mixed_precision"]
        assert mp["used_bits"] <= mp["budget_bits"]
        assert set(mp["bits"].values()) <= set(range(4, 9))
        # Each module's ops at its width: weights and inputs, or (mp_widths="weights") the weights alone.
        inputs_at = 6 if options.get("mp_widths") == "weights" else None
        for module, width in mp["bits"].items():
            for op in ("qkv", "proj") if module.endswith("attn") else ("fc1", "fc2"):
                assert described[f"{module}.{op}"]["weight"]["bits"] == width
                assert described[f"{module}.{op}"]["input"]["bits"] == (inputs_at or width)


def test_simulation_a_few_images_at_a_time_gives_one_forwards_logits(tiny):
    """vit.simulate splits a batch: every op's result for an image must not depend on the others in its
    batch (the integer GEMMs' chunking follows a batch's ranges, the outlier channels a batch's outliers)."""
    model, x, _ = tiny
    config = recipe_config("adfq", "W4A4", iters=0, qkv_threshold=0.5, fc1_threshold=0.5)  # outliers here
    qm = quantize(model, config, [x[:48], x[48:]], (x[:1],))
    images = x[:vit.SIMULATION_IMAGES * 2 + 1]
    with torch.no_grad():
        whole = qm.module(images)
        one_by_one = torch.cat([qm.module(image[None]) for image in images])
    assert min(qm.details["outlier_fraction"].values()) > 0
    assert torch.equal(vit.simulate(qm.module, images), whole) and torch.equal(whole, one_by_one)


def test_adfq_default_schedule_buys_the_same_work_on_every_model(tiny, monkeypatch):
    """--iters unset on a CPU: the paper's 3000 x 32 where DEFAULT_WORK_MACS affords it, else 8 images per
    iteration and as many iterations as it buys (600 on the 224-px ViT-S/14, which counts 6.12 GMAC); a GPU
    or an explicit --iters gets the paper's batch. The result records the schedule it ran."""
    from vitq_edge.quant import adfq

    def schedule(macs, **options):
        config = adfq.default_schedule(recipe_config("adfq", "W4A4", **options), macs)
        return config.iters, config.batch_size, adfq.lr_factor(config)

    assert schedule(6.12e9) == (600, 8, 5.0)
    assert schedule(1e6) == (3000, 32, 1.0)
    assert schedule(6.12e9, iters=200) == (200, 32, 15.0)
    assert schedule(6.12e9, iters=20, scale_lr=False) == (20, 32, 1.0)
    assert schedule(6.12e9, batch_size=32) == (150, 32, 15.0)  # the same work in batches of 32
    assert schedule(6.12e9, device="cuda") == (3000, 32, 1.0)
    assert schedule(1e15)[:2] == (10, 8)
    model, x, _ = tiny
    qmodel = vit.quantize_vit(model, adfq.adfq_factory(recipe_config("adfq", "W4A4")))
    tokens, dim, hidden, heads = 17, 32, 128, 2  # 16 patches of 4x4 + the class token
    block = tokens * dim * (3 * dim + dim + 2 * hidden) + 2 * heads * tokens * tokens * (dim // heads)
    assert adfq.model_macs(qmodel, x) == 16 * 16 * dim + 2 * block + dim * 5  # patch conv, 2 blocks, head
    monkeypatch.setattr(adfq, "DEFAULT_WORK_MACS", adfq.model_macs(qmodel, x) * 8 * 20)
    qm = quantize(model, recipe_config("adfq", "W4A4"), [x[:48], x[48:]], (x[:1],))
    assert (qm.config.iters, qm.config.batch_size) == (20, 8)
    assert qm.details["iters"] == 20 and qm.details["lr_factor"] == 15.0
    assert recipe_config("adfq", "W4A4", iters="none").iters is None
    assert recipe_config("adfq", "W4A4", iters="300").iters == 300


def test_adfq_fc1_threshold_by_width_and_recorded(tiny):
    """fc1_threshold unset: fc1 inputs above 5 stay float at 4 bits (the code's `--outlier 5`), above 10
    wider (its README command's); an explicit value wins at every width; a build records the threshold it
    used. qkv keeps its 5."""
    from vitq_edge.quant.adfq import adfq_factory

    def fc1_and_qkv(bits, **options):
        make = adfq_factory(recipe_config("adfq", bits, **options))
        return make("blocks.0.mlp.fc1", "input").threshold, make("blocks.0.attn.qkv", "input").threshold

    assert fc1_and_qkv("W4A4") == (5.0, 5.0)
    assert fc1_and_qkv("W6A6") == fc1_and_qkv("W8A8") == (10.0, 5.0)
    assert fc1_and_qkv("W4A4", fc1_threshold="10") == (10.0, 5.0)
    assert fc1_and_qkv("W8A8", fc1_threshold=5) == (5.0, 5.0)
    model, x, _ = tiny
    qm = quantize(model, recipe_config("adfq", "W4A4", iters=0), [x[:48], x[48:]], (x[:1],))
    assert qm.config.fc1_threshold == 5.0
    assert qm.module.blocks[1].mlp.fc1.input_quant.threshold == 5.0


@pytest.mark.parametrize("matmul_scales", ["fixed", "learned"])
def test_adfq_reconstruction_learns_the_q_k_v_scales_only_when_asked(tiny, matmul_scales):
    """An attention unit's reconstruction learns its qkv and proj input scales; those of q, k and v (the
    attention products' inputs) only with matmul_scales="learned". No scale stays trainable after."""
    from vitq_edge.quant import adfq
    from vitq_edge.quant.calibration import BlockInputs, batches

    model, x, _ = tiny
    config = replace(recipe_config("adfq", "W4A4", matmul_scales=matmul_scales), iters=20, batch_size=8)
    qmodel = vit.quantize_vit(model, adfq.adfq_factory(config))
    vit.calibrate_activations(qmodel, batches(x, 48))
    vit.set_enabled(qmodel, False)
    unit = qmodel.blocks[0].attn
    inputs = BlockInputs(qmodel, x, 48).of("blocks.0.attn", unit)[0]
    q_k_v = (unit.qk.a_quant, unit.qk.b_quant, unit.av.b_quant)
    inputs_of_linears = (unit.qkv.input_quant, unit.proj.input_quant)
    before = [q.scale.clone() for q in q_k_v + inputs_of_linears]
    adfq._set_unit_enabled(unit, True)
    adfq.reconstruct_unit(unit, inputs, inputs, config, torch.Generator().manual_seed(0), "test")
    moved = [not torch.equal(b, q.scale) for b, q in zip(before, q_k_v + inputs_of_linears, strict=True)]
    assert moved == [matmul_scales == "learned"] * 3 + [True, True]
    assert not any(q.scale.requires_grad for q in q_k_v + inputs_of_linears)


@pytest.mark.parametrize("bits", ["W4A4", "W6A6", "W8A8"])
def test_adfq_probability_ladder_keeps_a_257_token_softmax(bits):
    """adfq's "auto" log ladders per role: the attention probabilities get about 16 octaves at every width, so
    a 224-px ViT-S head (257 keys, one peak at ~0.5, the rest near 2^-9 with spread) keeps its diffuse mass;
    the old rule (the post-GELU one, ~8 octaves, still used for fc2's input) zeroed a quarter of its mass."""
    from vitq_edge.quant.adfq import adfq_factory, log_steps_per_octave

    a_bits = int(bits[-1])
    make = adfq_factory(recipe_config("adfq", bits, gelu_quantizer="shift-log2"))
    probs_q, gelu_q = make("blocks.0.attn.av", "a"), make("blocks.0.mlp.fc2", "input")
    assert isinstance(probs_q, LogQuantizer) and isinstance(gelu_q, ShiftLog2Quantizer)
    assert 15 <= (2 ** a_bits - 1) / probs_q.steps_per_octave < 16
    assert 7.5 <= (2 ** a_bits - 1) / gelu_q.steps_per_octave < 8
    assert log_steps_per_octave("sqrt2", a_bits, "probabilities") == 2
    assert log_steps_per_octave("sqrt2", a_bits, "gelu") == 2

    torch.manual_seed(0)
    logits = torch.randn(64, 257)
    logits[:, 0] += 6.0
    p = logits.softmax(-1)

    def mass_zeroed(q: LogQuantizer) -> float:  # the probability mass below the ladder's lowest level
        q.init_range(p)
        return float((p * (q.quantize(p) == 0)).sum(-1).mean())

    assert mass_zeroed(probs_q) < 1e-3
    assert mass_zeroed(LogQuantizer(a_bits, steps_per_octave=gelu_q.steps_per_octave)) > 0.2


def test_adfq_at_8_bits_keeps_the_rare_large_post_gelu_values():
    """adfq's "auto" choices at 8 bits (adfq.gelu_quantizer, uniform_init): a pretrained ViT's fc2 input has a
    few values several times its 99.999% quantile (DINOv2: 13.6 against 2.5 in one block), on a few tokens.
    Shift-Log2 with the code's top level (gelu_init="mse") sits at that quantile and clips them; a uniform
    min/max code keeps them, so those tokens' fc2 outputs stay close (as does Shift-Log2 with its default
    gelu_init="max", at every width). Below 8 bits the paper's Shift-Log2 and the MSE ranges stay; either can
    be forced at any width."""
    from vitq_edge.quant.adfq import adfq_factory

    torch.manual_seed(0)
    x = torch.nn.functional.gelu(torch.randn(4096, 256))
    x[:2, :3] = 12.0  # two tokens with massive activations in three channels
    w = torch.randn(64, 256) / 16

    def fc2_error(bits: str, **options) -> tuple[str, float]:
        q = adfq_factory(recipe_config("adfq", bits, **options))("blocks.0.mlp.fc2", "input")
        q.init_range(x)
        with torch.no_grad():
            y, got = x[:2] @ w.T, q.quantize(x[:2]) @ w.T
        return type(q).__name__, float((got - y).pow(2).mean() / y.pow(2).mean())

    kind, auto = fc2_error("W8A8")
    assert kind == "UniformQuantizer"
    kind, shift_log2 = fc2_error("W8A8", gelu_quantizer="shift-log2", gelu_init="mse")
    assert kind == "ShiftLog2Quantizer" and auto * 100 < shift_log2
    assert fc2_error("W8A8", gelu_quantizer="shift-log2")[1] * 100 < shift_log2  # default top level: no clipping
    for bits in ("W4A4", "W6A6"):  # the paper's Shift-Log2 below 8 bits, its top level at the maximum
        kind, at_max = fc2_error(bits)
        assert kind == "ShiftLog2Quantizer" and at_max < fc2_error(bits, gelu_init="mse")[1]
    assert fc2_error("W4A4", gelu_quantizer="uniform")[0] == "UniformQuantizer"
    make8, make4 = (adfq_factory(recipe_config("adfq", b)) for b in ("W8A8", "W4A4"))
    assert make8("blocks.0.attn.qk", "a").init == "minmax" and make4("blocks.0.attn.qk", "a").init == "mse"
    assert adfq_factory(recipe_config("adfq", "W8A8", uniform_init="mse"))("blocks.0.attn.proj", "input").init == "mse"
    # Weights: the code's MSE range unless weight_init says otherwise.
    assert make8("blocks.0.attn.qkv", "weight").init == "mse"
    minmax_weights = adfq_factory(recipe_config("adfq", "W8A8", weight_init="minmax"))
    assert minmax_weights("blocks.0.mlp.fc1", "weight").init == "minmax"
    with pytest.raises(VitqError, match="gelu_quantizer"):
        recipe_config("adfq", "W8A8", gelu_quantizer="log")


def test_sequential_activation_calibration_reads_the_quantized_models_inputs(tiny):
    """act_calibration="sequential" (the ADFQ-ViT code): a unit's ranges come from what the model quantized
    up to it feeds it; the first unit sees the images either way."""
    model, x, _ = tiny
    scales = {}
    for mode in ("float", "sequential"):
        qm = quantize(model, recipe_config("adfq", "W4A4", iters=0, act_calibration=mode), [x], (x[:1],))
        scales[mode] = {n: q.scale.clone() for n, q in vit.quantizers(qm.module) if isinstance(q, UniformQuantizer)
                        and n.endswith("input_quant")}
    assert torch.equal(scales["float"]["patch_embed.proj.input_quant"],
                       scales["sequential"]["patch_embed.proj.input_quant"])
    assert not torch.equal(scales["float"]["blocks.1.mlp.fc1.input_quant"],
                           scales["sequential"]["blocks.1.mlp.fc1.input_quant"])


def test_lower_bits_cost_accuracy_and_size(tiny):
    model, x, y = tiny
    results = {}
    for bits in ("W8A8", "W6A6", "W4A4"):
        qm = quantize(model, recipe_config("minmax", bits), [x], (x[:1],))
        with torch.no_grad():
            results[bits] = (_sqnr(y, qm.module(x)), qm.size_bytes)
    assert results["W8A8"][0] > results["W6A6"][0] > results["W4A4"][0]
    assert results["W8A8"][1] > results["W6A6"][1] > results["W4A4"][1]


def test_deit_is_supported_and_unsupported_variants_are_refused():
    import timm

    deit = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, depth=1).eval()
    q = vit.quantize_vit(deit, lambda op, role: UniformQuantizer(8, signed=role != "weight"))
    x = torch.randn(2, 3, 32, 32)
    vit.calibrate_activations(q, [x])
    with torch.no_grad():
        assert _sqnr(deit(x), q(x)) > 15
    qk_norm = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, qk_norm=True)
    with pytest.raises(VitqError, match="qk-norm"):
        vit.quantize_vit(qk_norm, lambda op, role: UniformQuantizer(8))


@pytest.mark.parametrize("name,bits,options,fragment", [
    ("minmax", "W5A5", {}, "supports --bits"), ("adfq", "mixed:6", {}, "supports --bits"),
    ("liu2021", "mixed:12", {}, "supports --bits"), ("minmax", None, {"iters": 3}, "no option 'iters'"),
    ("nope", None, {}, "unknown recipe"),
    ("adfq", "W4A4", {"round_gradient": "off"}, "round_gradient='off': use ste or none"),
    ("adfq", "W4A4", {"act_calibration": "lazy"}, "use float or sequential"),
    ("liu2021", "mixed:6", {"mp_normalise": "all"}, "mp_normalise='all': use none or kind"),
    ("minmax", "W4A4", {"head_bits": 12}, "head_bits=12: use 4 to 8, or none"),
    ("adfq", "W4A4", {"stem_bits": 3}, "stem_bits=3: use 4 to 8, or none"),
])
def test_bad_recipe_configs_name_the_problem(name, bits, options, fragment):
    with pytest.raises(VitqError, match=fragment):
        recipe_config(name, bits, **options)


# ---- the CLI ---------------------------------------------------------------------------

@pytest.mark.slow
def test_build_with_a_paper_recipe_writes_its_quantization_into_the_manifest(tmp_path):
    out = tmp_path / "minmax"
    result = run_cli("build", "--recipe", "minmax", "--bits", "W4A4", "--calib-limit", "128", "--eval-limit", "100",
                     "--out", str(out), "--quiet")
    assert result.code == 0, result.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"] == "minmax" and manifest["bits"] == "W4A4"
    assert "layer_norm" in manifest["float_ops"] and "softmax" not in manifest["float_ops"]
    quant = manifest["quantization"]
    assert 0 < quant["packed_size_bytes"] < manifest["size_bytes"]
    assert quant["quantizers"]["blocks.0.mlp.fc1"]["weight"]["bits"] == 4
    for op in ("patch_embed.proj", "head"):  # the first and last ops keep 8 bits
        assert quant["quantizers"][op]["weight"]["bits"] == quant["quantizers"][op]["input"]["bits"] == 8
    # The program runs the integer kernels and computes what the simulation computes.
    assert quant["program_arithmetic"] == "integer"
    assert manifest["custom_ops"] == ["vitq::attention", "vitq::linear"]
    assert manifest["kernels"] == {"library": "libvitq_kernels.so", "version": KERNELS_VERSION}
    assert quant["arithmetic_version"] == ARITHMETIC_VERSION
    acc = manifest["accuracy"]
    assert acc["pte_agrees_with_simulated"] >= 99.0 and abs(acc["pte_host"] - acc["simulated"]) <= 1.0

    # The same program claiming another integer arithmetic is refused where it would run: it would
    # compute other bits than its build measured.
    old = tmp_path / "old"
    old.mkdir()
    (old / "model.pte").write_bytes((out / "model.pte").read_bytes())
    quant["arithmetic_version"] = ARITHMETIC_VERSION - 1
    (old / "manifest.json").write_text(json.dumps(manifest))
    for command in (["bench", str(old), "--runs", "1", "--no-record"], ["eval", str(old), "--limit", "8"]):
        assert_user_error(invoke_cli(*command), f"built for integer arithmetic {ARITHMETIC_VERSION - 1}",
                          "run `vitq-edge build --recipe minmax")


def test_a_program_is_run_only_on_the_arithmetic_it_was_built_for():
    from vitq_edge.artifacts import check_arithmetic

    kernels = {"library": "libvitq_kernels.so", "version": KERNELS_VERSION}
    now = {"kernels": kernels, "quantization": {"arithmetic_version": ARITHMETIC_VERSION}, "command": "c"}
    check_arithmetic(now, "b")
    # Built before the version was recorded: the first arithmetic.
    with pytest.raises(VitqError, match="b was built for integer arithmetic 1 .*; run `vitq-edge build x` again"):
        check_arithmetic({"kernels": kernels, "quantization": {}, "command": "vitq-edge build x"}, "b")
    # A quantized program lowered as float runs no kernels; stock programs have no quantization.
    check_arithmetic({"kernels": None, "quantization": {"arithmetic_version": 1}}, "b")
    check_arithmetic({"kernels": None, "quantization": None}, "b")


@pytest.mark.parametrize("args,fragment", [
    (["--recipe", "minmax", "--bits", "W3A3"], "supports --bits"),
    (["--recipe", "minmax", "--iters", "10"], "--iters applies to --recipe adfq"),
    (["--recipe", "adfq", "--calib-device", "cuda"], "no CUDA GPU"),
    (["--recipe", "xnnpack-int8", "--calib-device", "cuda"], "applies to the paper recipes"),
    (["--recipe", "liu2021", "--bits", "mixed:x"], "supports --bits"),
])
def test_build_recipe_errors(tmp_path, args, fragment):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    out = tmp_path / "b"
    assert_user_error(invoke_cli("build", *args, "--out", str(out), "--quiet"), fragment)
    assert not out.exists()


def test_observations_of_one_huge_batch_keep_only_its_first_images(monkeypatch):
    from vitq_edge.quant import quantizers

    monkeypatch.setattr(quantizers, "MAX_BATCH_OBSERVED", 1000)
    monkeypatch.setattr(quantizers, "MAX_OBSERVED", 1500)
    q = UniformQuantizer(8)
    q.observe(True)
    x = torch.arange(64 * 300, dtype=torch.float32).reshape(64, 3, 100)  # 300 values per image
    assert q(x) is x  # observing never changes the forward
    q(x)
    q(x)  # past MAX_OBSERVED: not kept
    assert [t.shape[0] for t in q._seen] == [3, 3] and torch.equal(q._seen[0], x[:3])
    small = torch.ones(2, 3, 100)
    q.clear_observations()
    q(small)
    assert q._seen[0].shape == small.shape  # a batch within the limit is kept whole
    big = torch.zeros(64, 3, 100)
    q.clear_observations()
    q(big)
    assert q._seen[0].untyped_storage().nbytes() == 3 * 300 * 4  # its own storage, not a view of the batch


def test_calibration_stops_once_every_quantizer_has_observed_all_it_keeps(tiny, monkeypatch):
    from vitq_edge.quant import quantizers
    from vitq_edge.quant.calibration import BlockInputs, batches
    from vitq_edge.quant.minmax import minmax_factory

    model, x, _ = tiny
    # Every quantizer of a block fills up on 48 images (>= 26,000 values each); the head's
    # input (32 values per image) does not on 96.
    monkeypatch.setattr(quantizers, "MAX_OBSERVED", 20_000)

    def calibrated(images: torch.Tensor, part: str) -> tuple[torch.nn.Module, int]:
        qmodel = vit.quantize_vit(model, minmax_factory(lambda op: (8, 8)))
        vit.set_enabled(qmodel, False)
        tokens = BlockInputs(qmodel, x, 48).block_input(0)[:len(images)]
        vit.set_enabled(qmodel, True)
        module = qmodel.blocks[0] if part == "block" else qmodel
        calls = []
        module.register_forward_pre_hook(lambda m, args: calls.append(1))
        vit.calibrate_activations(module, batches(tokens if part == "block" else images, 48))
        return qmodel, len(calls)

    whole, whole_calls = calibrated(x, "block")
    first, _ = calibrated(x[:48], "block")
    assert whole_calls == 1  # the second batch would change nothing
    for (name, got), want in zip(whole.blocks[0].state_dict().items(), first.blocks[0].state_dict().values(),
                                 strict=True):
        assert torch.equal(got, want), name  # every scale and zero point as from the first batch alone
    assert calibrated(x, "model")[1] == 2  # the head's quantizer still wants the second batch


# ---- the arithmetic mode and the one lowering rule --------------------------------------

def _calibrated_minmax(tiny, bits: int):
    from vitq_edge.quant.minmax import minmax_factory

    model, x, _ = tiny
    qmodel = vit.quantize_vit(model, minmax_factory(lambda op: (bits, bits)))
    vit.calibrate_activations(qmodel, [x])
    return qmodel, x


def test_kernel_arithmetic_is_the_default_whatever_the_grad_mode(tiny):
    qmodel, x = _calibrated_minmax(tiny, 4)
    assert vit.current_arithmetic() == "kernel"
    with torch.no_grad():
        inference = qmodel(x)
    assert torch.equal(qmodel(x).detach(), inference)  # grad mode on: still the kernels' arithmetic
    with vit.arithmetic("fake-quant"):
        assert vit.current_arithmetic() == "fake-quant"
        fake = qmodel(x)
    assert vit.current_arithmetic() == "kernel"
    # Fake quantization computes nearly the same values by another path (torch's GELU and softmax where
    # the kernels take GELU by table and integer exponentials): as far from the float model, within 0.5 dB.
    assert not torch.equal(fake.detach(), inference)
    y = tiny[2]
    assert abs(_sqnr(y, fake.detach()) - _sqnr(y, inference)) < 0.5


def test_fake_quant_arithmetic_is_differentiable_and_kernel_arithmetic_is_not(tiny):
    qmodel, x = _calibrated_minmax(tiny, 8)
    scale = qmodel.blocks[0].mlp.fc1.input_quant.scale
    scale.requires_grad_(True)
    try:
        with vit.arithmetic("fake-quant"):
            qmodel(x[:4]).sum().backward()
        assert scale.grad is not None and float(scale.grad.abs()) > 0
        # The kernels' arithmetic uses the scale's value only: no gradient reaches it.
        assert not qmodel(x[:4]).requires_grad
    finally:
        scale.requires_grad_(False)
    with pytest.raises(ValueError, match="kernel"), vit.arithmetic("exact"):
        pass


def test_one_rule_decides_the_simulation_and_the_lowering(tiny):
    from vitq_edge.lower.integer_vit import NotLowerable, integer_vit

    qmodel, x = _calibrated_minmax(tiny, 8)
    assert all(vit.why_not_integer(op, name) is None for name, op in vit.quant_ops(qmodel)
               if isinstance(op, vit.QuantLinear | vit.QuantConv2d | vit.QuantAttention))
    integer_vit(qmodel)  # lowerable
    fc1 = qmodel.blocks[1].mlp.fc1
    fc1.input_quant.enabled = False  # a layer left in float: neither path may treat it as integer
    why = vit.why_not_integer(fc1, "blocks.1.mlp.fc1")
    assert why == "blocks.1.mlp.fc1's input is not quantized"
    assert not vit.integer_operands(fc1)
    with pytest.raises(NotLowerable, match=r"blocks\.1\.mlp\.fc1's input is not quantized"):
        integer_vit(qmodel)
    fc1.input_quant.enabled = True
    attn = qmodel.blocks[0].attn
    attn.qk.b_quant.zero_point.fill_(0.5)
    assert attn.why_not_integer("blocks.0.attn") == "blocks.0.attn's k has a fractional zero point"
    assert not attn.integer_operands()
    with pytest.raises(NotLowerable, match="fractional zero point"):
        integer_vit(qmodel)
