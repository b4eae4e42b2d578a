"""Quantizer modules: the fake-quant forward of every quantizer in `arith.py`, with calibration.

A quantizer is an `nn.Module` between a value and its consumer. Its life:

    q.observe(True); model(calibration batches); q.observe(False)   # records inputs
    q.init_range()                                                  # sets scale / zero point
    model(x)                                                        # x -> the device's value

`enabled = False` makes it the identity (float), which recipes use to quantize one
layer at a time. Scales are `nn.Parameter`s so the ADFQ reconstruction can learn
them; zero points are buffers (never learned, as in the ADFQ-ViT code).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from vitq_edge.quant import arith

# One scale per tensor, per output channel (dim 0 of a weight) or per token position (activations).
Granularity = Literal["tensor", "channel", "token"]

# Observations kept per quantizer for range search (first images first); enough for
# stable quantiles, small enough for DeiT-sized activations. Batches are kept whole until
# MAX_OBSERVED values are seen; a single batch larger than MAX_BATCH_OBSERVED keeps only its
# first images (a 224-px ViT-S attention map is 0.4 M values per image: 256 images of every
# quantizer's input would need ~20 GB).
MAX_OBSERVED = 1 << 22
MAX_BATCH_OBSERVED = 1 << 24
ACT_QUANTILES = (0.999, 0.9999, 0.99999, 1.0)


def tail_quantiles(x: torch.Tensor, qs: tuple[float, ...], dim: int | None = None,
                   upper: bool = True) -> list[torch.Tensor]:
    """Nearest-rank quantiles close to 1 (upper) or 0 (lower, at 1 - q) along `dim` (None: all).

    Range searches only ask for extreme quantiles; topk over the tail is far cheaper
    than torch.quantile's full sort, and has no 16M-element limit.
    """
    if dim is None:
        x, dim = x.reshape(1, -1), 1
    n = x.shape[dim]
    ranks = [min(n - 1, int((1 - q) * (n - 1))) for q in qs]
    tail = torch.topk(x if upper else -x, max(ranks) + 1, dim=dim, sorted=True).values
    sign = 1 if upper else -1
    return [sign * tail.select(dim, r).squeeze() for r in ranks]


def quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """One quantile of all of x (q near 0 or 1)."""
    return tail_quantiles(x, (q,), upper=q >= 0.5)[0] if q >= 0.5 else tail_quantiles(x, (1 - q,), upper=False)[0]


def log_delta(x: torch.Tensor, top: torch.Tensor, bits: int, steps_per_octave: int, search: bool) -> torch.Tensor:
    """The top level of a log quantizer: `top`, or with `search` the lowest-MSE of top x 1.0 .. 0.5."""
    candidates = [top * r for r in (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)] if search else [top]
    errs = [float((arith.fake_log(x, d, bits, steps_per_octave) - x).pow(2).sum()) for d in candidates]
    return candidates[min(range(len(errs)), key=errs.__getitem__)]


def _base_name(steps_per_octave: int) -> str:
    return {1: "2", 2: "sqrt2"}.get(steps_per_octave, f"2^(1/{steps_per_octave})")


class Quantizer(nn.Module):
    """Base: observation bookkeeping and the enabled switch."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.enabled = True
        self._observing = False
        self._seen: list[torch.Tensor] = []
        self._seen_numel = 0

    def observe(self, on: bool) -> None:
        self._observing = on

    @property
    def observed_enough(self) -> bool:
        """True once observing keeps nothing more (MAX_OBSERVED values seen)."""
        return self._seen_numel >= MAX_OBSERVED

    def observed(self) -> torch.Tensor:
        return torch.cat(self._seen) if self._seen else torch.zeros(0)

    def clear_observations(self) -> None:
        self._seen, self._seen_numel = [], 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._observing:
            if not self.observed_enough:
                kept = x.detach()
                if kept.dim() > 1 and kept.numel() > MAX_BATCH_OBSERVED:  # dim 0: images
                    # A copy: a view would keep the whole batch's storage alive.
                    kept = kept[:max(1, MAX_BATCH_OBSERVED // kept[0].numel())].clone()
                self._seen.append(kept)
                self._seen_numel += kept.numel()
            return x
        if not self.enabled:
            return x
        return self.quantize(x)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def init_range(self, x: torch.Tensor | None = None) -> None:
        """Set the quantization parameters from `x` (default: what was observed)."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"kind": type(self).__name__, "bits": self.bits}


class UniformQuantizer(Quantizer):
    """Uniform quantizer: signed symmetric or unsigned asymmetric; per tensor, channel or token.

    granularity: "tensor"; "channel" (dim 0 of a weight: one scale per output channel);
    "token" (activations [..., tokens, channels]: one static scale per token position).
    init: "minmax" (the observed range), "mse" (range shrunk to the lowest-MSE candidate:
    quantiles for activations, a grid of clipping ratios per channel for weights).
    """

    def __init__(self, bits: int, signed: bool = True, granularity: Granularity = "tensor",
                 init: Literal["minmax", "mse"] = "minmax") -> None:
        super().__init__(bits)
        if granularity not in ("tensor", "channel", "token"):
            raise ValueError(f"granularity must be tensor, channel or token, not {granularity}")
        self.signed, self.granularity, self.init = signed, granularity, init
        self.scale = nn.Parameter(torch.ones(()), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(()))

    @property
    def qrange(self) -> tuple[int, int]:
        return arith.uniform_range(self.bits, self.signed)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax = self.qrange
        return arith.fake_uniform(x, self.scale, self.zero_point, qmin, qmax)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax = self.qrange
        return arith.uniform_codes(x, self.scale.detach(), self.zero_point, qmin, qmax)

    def _reduce(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group (min, max), shaped to broadcast against x."""
        if self.granularity == "tensor":
            return x.min(), x.max()
        if self.granularity == "channel":
            flat = x.reshape(x.shape[0], -1)
            shape = (x.shape[0],) + (1,) * (x.dim() - 1)
            return flat.min(1).values.reshape(shape), flat.max(1).values.reshape(shape)
        per_token = x.transpose(-2, 0).reshape(x.shape[-2], -1) if x.dim() > 2 else x
        return per_token.min(1).values[:, None], per_token.max(1).values[:, None]

    def params_for(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.signed:
            return arith.symmetric_params(torch.maximum(lo.abs(), hi.abs()), self.bits)
        return arith.asymmetric_params(lo, hi, self.bits)

    def set_params(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        self.scale = nn.Parameter(scale.detach().clone().float(), requires_grad=self.scale.requires_grad)
        self.zero_point = zero_point.detach().clone().float()

    def init_range(self, x: torch.Tensor | None = None) -> None:
        x = self.observed() if x is None else x
        if x.numel() == 0:
            return
        lo, hi = self._reduce(x)
        if self.init == "mse":
            lo, hi = self._mse_range(x, lo, hi)
        self.set_params(*self.params_for(lo, hi))

    def _error(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """Squared quantization error per group for the range [lo, hi]."""
        scale, zp = self.params_for(lo, hi)
        qmin, qmax = self.qrange
        err = (arith.fake_uniform(x, scale, zp, qmin, qmax) - x).pow(2)
        if self.granularity == "tensor":
            return err.sum()
        if self.granularity == "channel":
            return err.reshape(err.shape[0], -1).sum(1)
        return err.transpose(-2, 0).reshape(err.shape[-2], -1).sum(1) if err.dim() > 2 else err.sum(1)

    def _mse_range(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.granularity == "channel":  # weights: clip ratios per output channel
            candidates = [(lo * r, hi * r) for r in torch.linspace(0.5, 1.0, 26).tolist()]
        elif self.granularity == "tensor":
            his = tail_quantiles(x, ACT_QUANTILES, upper=True)
            los = tail_quantiles(x, ACT_QUANTILES, upper=False)
            candidates = list(zip(los, his, strict=True))
        else:
            per_token = x.transpose(-2, 0).reshape(x.shape[-2], -1) if x.dim() > 2 else x
            his = tail_quantiles(per_token, ACT_QUANTILES, dim=1, upper=True)
            los = tail_quantiles(per_token, ACT_QUANTILES, dim=1, upper=False)
            candidates = [(lo[:, None], hi[:, None]) for lo, hi in zip(los, his, strict=True)]
        best_lo, best_hi, best_err = lo, hi, None
        for c_lo, c_hi in candidates:
            err = self._error(x, c_lo, c_hi)
            if best_err is None:
                best_lo, best_hi, best_err = c_lo, c_hi, err
                continue
            better = err < best_err
            shape = best_lo.shape
            best_lo = torch.where(better.reshape(shape) if better.dim() else better, c_lo, best_lo)
            best_hi = torch.where(better.reshape(shape) if better.dim() else better, c_hi, best_hi)
            best_err = torch.minimum(err, best_err)
        return best_lo, best_hi

    def describe(self) -> dict:
        return {**super().describe(), "signed": self.signed, "granularity": self.granularity}


class LogQuantizer(Quantizer):
    """Log quantizer of non-negative values (post-softmax): levels delta * 2^(-q/k) with
    k = steps_per_octave: 1 is log2, 2 log-sqrt2, more a finer ladder.

    delta (the largest level) starts at the observed maximum, or with init="mse" at the
    lowest-MSE of a few candidates below it.
    """

    def __init__(self, bits: int, steps_per_octave: int = 2, init: str = "mse") -> None:
        super().__init__(bits)
        if steps_per_octave < 1:
            raise ValueError("steps_per_octave must be >= 1: 1 is log2, 2 is log-sqrt2")
        self.steps_per_octave, self.init = steps_per_octave, init
        self.delta = nn.Parameter(torch.ones(()), requires_grad=False)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return arith.fake_log(x, self.delta, self.bits, self.steps_per_octave)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        return arith.log_codes(x, self.delta.detach(), self.bits, self.steps_per_octave)

    def init_range(self, x: torch.Tensor | None = None) -> None:
        x = self.observed() if x is None else x
        if x.numel() == 0:
            return
        top = torch.clamp(x.max(), min=arith.EPS)
        best = log_delta(x, top, self.bits, self.steps_per_octave, search=self.init == "mse")
        self.delta = nn.Parameter(best.detach().clone().float(), requires_grad=self.delta.requires_grad)

    def describe(self) -> dict:
        return {**super().describe(), "base": _base_name(self.steps_per_octave)}


class PerPatchOutlierQuantizer(UniformQuantizer):
    """ADFQ-ViT's PPOQ for post-LayerNorm activations (inputs of qkv and fc1).

    Values with |x| > threshold stay in full precision (an absolute magnitude, as in the
    ADFQ-ViT code: 5 for qkv, 5 or 10 for fc1, adfq.fc1_threshold); the rest gets one asymmetric (scale, zero
    point) per token position, its range chosen among quantiles by MSE (the code's
    choice; init="minmax" gives the paper's plain per-patch min/max). The fraction of
    calibration values kept as outliers is recorded in `outlier_fraction`.
    """

    def __init__(self, bits: int, threshold: float, init: str = "mse", round_gradient: bool = True) -> None:
        super().__init__(bits, signed=False, granularity="token", init=init)
        self.threshold = float(threshold)
        self.outlier_fraction = 0.0
        self.round_gradient = round_gradient  # see arith.fake_ppoq

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return arith.fake_ppoq(x, self.scale, self.zero_point, self.bits, self.threshold, self.round_gradient)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        inliers = torch.where(arith.outlier_mask(x, self.threshold), torch.zeros_like(x), x)
        return super().codes(inliers)

    def init_range(self, x: torch.Tensor | None = None) -> None:
        x = self.observed() if x is None else x
        if x.numel() == 0:
            return
        mask = arith.outlier_mask(x, self.threshold)
        self.outlier_fraction = float(mask.float().mean())
        super().init_range(torch.where(mask, torch.zeros_like(x), x))

    def describe(self) -> dict:
        return {**super().describe(), "threshold": self.threshold,
                "outlier_fraction": round(self.outlier_fraction, 6)}


class ShiftLog2Quantizer(Quantizer):
    """ADFQ-ViT's Shift-Log2 quantizer for post-GELU activations (input of fc2).

    x' = x + shift is positive for every GELU output, then log-coded (steps_per_octave = 2:
    log-sqrt2, the ADFQ-ViT code's default; 1: log2, the paper's text). The forward returns
    x' - shift, the value fc2 sees; on the device fc2 consumes x' and its bias carries
    -shift * W @ 1 (see `QuantLinear.folded_bias`). The shift is static: minus the
    calibration minimum plus a margin, never less than GELU's own minimum (-0.1700),
    where the ADFQ-ViT code takes the batch minimum at every forward (which cannot fold
    into a bias). init "mse": the top level from the 99.999% quantile, shrunk by the MSE search
    (the code's); "max": the observed maximum, so that no value clips.
    """

    GELU_MIN = -0.16997  # min of x * Phi(x), at x = -0.7518

    def __init__(self, bits: int, steps_per_octave: int = 2, init: str = "mse", round_gradient: bool = True) -> None:
        super().__init__(bits)
        self.steps_per_octave, self.init = steps_per_octave, init
        self.round_gradient = round_gradient  # see arith.fake_shift_log
        self.delta = nn.Parameter(torch.ones(()), requires_grad=False)
        self.register_buffer("shift", torch.tensor(-self.GELU_MIN + 1e-3))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        shifted = arith.fake_shift_log(x, self.shift, self.delta, self.bits, self.steps_per_octave, self.round_gradient)
        return shifted - self.shift

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        return arith.log_codes(x + self.shift, self.delta.detach(), self.bits, self.steps_per_octave)

    def init_range(self, x: torch.Tensor | None = None) -> None:
        x = self.observed() if x is None else x
        if x.numel() == 0:
            return
        lowest = min(float(x.min()), self.GELU_MIN)
        self.shift = torch.tensor(-lowest + 1e-3)
        shifted = x + self.shift
        top = shifted.max() if self.init == "max" else quantile(shifted, 0.99999)
        best = log_delta(shifted, torch.clamp(top, min=arith.EPS), self.bits, self.steps_per_octave,
                         search=self.init == "mse")
        self.delta = nn.Parameter(best.detach().clone().float(), requires_grad=self.delta.requires_grad)

    def describe(self) -> dict:
        return {**super().describe(), "base": _base_name(self.steps_per_octave), "shift": round(float(self.shift), 6)}


class AdaRoundQuantizer(nn.Module):
    """AdaRound on top of a per-channel uniform weight quantizer (Nagel et al., 2020).

    While learning, the weight is floor(W/s) + h(V) with h a rectified sigmoid in [0, 1];
    `harden()` fixes h to {0, 1} and from then on the forward is the exact integer grid.
    """

    ZETA, GAMMA = 1.1, -0.1

    def __init__(self, base: UniformQuantizer, weight: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.bits = base.bits
        # The weight and its scale are fixed while rounding is learned: floor once.
        self.register_buffer("floor", torch.floor(weight.detach() / base.scale.detach()))
        rest = weight.detach() / base.scale.detach() - self.floor
        # Initialise V so that h(V) equals the fractional part: starts at plain rounding's neighbourhood.
        p = torch.clamp((rest - self.GAMMA) / (self.ZETA - self.GAMMA), 0.01, 0.99)
        self.alpha = nn.Parameter(torch.log(p / (1 - p)))
        self.hard = False

    @property
    def enabled(self) -> bool:
        return self.base.enabled

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (self.ZETA - self.GAMMA) + self.GAMMA, 0, 1)

    def regularizer(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """Codes of the weight this rounding was created for (`weight` is only checked)."""
        assert weight.shape == self.floor.shape
        offset = (self.alpha >= 0).float() if self.hard else self.h()
        qmin, qmax = self.base.qrange
        return torch.clamp(self.floor + offset + self.base.zero_point, qmin, qmax)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.base.enabled:
            return weight
        return arith.uniform_values(self.codes(weight), self.base.scale, self.base.zero_point)

    def harden(self) -> None:
        self.hard = True
        self.alpha.requires_grad_(False)
