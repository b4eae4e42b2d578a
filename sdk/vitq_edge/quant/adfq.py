"""ADFQ-ViT (Neural Networks 2025): PPOQ, Shift-Log2 and attention-score enhanced module-wise optimization.

Quantizers (as in the ADFQ-ViT code):
    qkv and fc1 inputs (post-LayerNorm)   PerPatchOutlierQuantizer (outliers > threshold stay float)
    fc2 input (post-GELU)                 ShiftLog2Quantizer (log-sqrt2 at 4 bits, see log_steps_per_octave);
                                          at 8 bits a uniform code (gelu_quantizer says why)
    attention probabilities (A @ V)       LogQuantizer (log2 at 4 bits: a wider range, likewise)
    q, k, v, proj / head / patch inputs   per-tensor asymmetric uniform, range by MSE (min/max at 8
                                          bits: uniform_init)
    weights                               per-output-channel asymmetric uniform (MSE: weight_init), then
                                          AdaRound

The program codes the probabilities in integers (quant/arith.py integer_log_attention): log codes
below each row's largest probability, from the integer q.k sums, normalized by the row's integer
sum of levels; the calibrated delta shapes the float model's quantizer during reconstruction only.
On the validation split this matches the float softmax coded below delta (real model, 1,000
images, the same programs: W8A8 96.0% -> 96.1% agreement with the float model, 22.26 -> 22.39 dB;
W4A4 73.6% -> 73.7%, 7.06 -> 7.14 dB; docs/validation/integer-log-softmax-adfq-W{8A8,4A4}.md).

Reconstruction, unit by unit in forward order (patch embedding, each attention module,
each MLP module, head), on the calibration images in batches of `batch_size`:
    input    QDrop-style: each element from the quantized model's input with probability
             1 - drop_prob, else from the float model's;
    loss     sum of squared output errors (float target) + round_weight * AdaRound
             regularizer (beta 20 -> 2 after a 20% warm-up) + for attention modules
             kl_weight * KL between float and quantized attention maps at temperature T;
    learned  AdaRound variables of every weight (Adam, weight_lr), the scales of the qkv,
             proj, fc1 and fc2 input quantizers (Adam, act_lr, cosine decay), and with
             matmul_scales "learned" those of q, k and v. Zero points are not learned.

Schedule (default_schedule): the paper's 3000 iterations of 32 images per unit where a CPU
work budget affords it (the bundled model), on a GPU, or with --iters; else 8 images per
iteration and as many iterations as the budget buys (600 for a 224-px ViT-S/14: about 45 min
of reconstruction on 2 cores instead of ~12 h), with both learning rates scaled by 3000/iters
(lr_factor). Chosen with tools/adfq_unit_probe.py on held-out training images: at equal work,
8 x 800 with scaled rates leaves 37% less output error on a middle attention unit than the
paper's rates at 32 x 200 (docs/validation/unit-probe-schedule.md); 600 iterations instead of
800 leave 1.7% (attention) and 2.7% (MLP) more, 500 leave 2.6% and 3.9% more
(docs/validation/unit-probe-iterations.md), and 800 no longer fit the hour once calibration
became sequential.

Two departures from the ADFQ-ViT code, each an option so that the validation split decides:
    act_calibration  "sequential": unit by unit, from the inputs the model quantized so far
                     gives the unit (the code); "float": every activation range from the float
                     model at once (ours before). Decided: "sequential". Calibration alone
                     (--iters 0, W4A4) reaches 27.4% against 24.0% on the validation split
                     (docs/validation/adfq-w4-0-{sequential,float}.md). With reconstruction it
                     replaces the whole-model calibration pass by one pass per unit over inputs
                     cached for the reconstruction anyway; at --iters 0 it adds that caching
                     (a W4A4 build of the real ViT-S: 9.2 min; 17 before calibrate_activations
                     stopped at full observers and fake_log looked levels up directly; float: 5).
                     Not yet confirmed at the default schedule (two ~60-min validation runs).
    round_gradient   "ste": PPOQ and Shift-Log2 round with a straight-through gradient to
                     their input and scale (ours); "none": codes from detached values, so the
                     scale learns through the dequantization only and fc1 gets no gradient
                     through fc2's input quantizer (the code's plain torch.round). Decided:
                     "ste". At the default schedule it leaves 12% less held-out output error
                     on a middle MLP unit (0.107 vs 0.121) and the same on its attention unit
                     (0.128 vs 0.129): docs/validation/unit-probe-round-gradient.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import replace

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vitq_edge.errors import VitqError
from vitq_edge.progress import StageClock, progress
from vitq_edge.quant import vit
from vitq_edge.quant.calibration import BlockInputs, batches, package, resolve_device, stack_calibration
from vitq_edge.quant.losses import attention_kl, attention_kl_target
from vitq_edge.quant.quantizers import (
    AdaRoundQuantizer,
    LogQuantizer,
    PerPatchOutlierQuantizer,
    Quantizer,
    ShiftLog2Quantizer,
    UniformQuantizer,
)
from vitq_edge.quant.registry import QuantizedModel, register_recipe
from vitq_edge.recipes import AdfqConfig, layer_bits, parse_bits

WARMUP = 0.2  # share of iterations without the rounding regularizer
BETA_START, BETA_END = 20.0, 2.0

PAPER_ITERS, PAPER_BATCH = 3000, 32  # per unit, the ADFQ-ViT README command
CPU_BATCH = 8
# The CPU work budget of the default schedule, in multiply-accumulates of image forward passes per unit:
# 600 iterations of 8 images on a 224-px ViT-S/14 (6.12 GMAC per image as model_macs counts it), about
# 0.17-0.2 s each on a 2-core x86 CPU, plus the per-unit set-up (the two residual streams, sequential
# ranges, float targets): the W4A4 build took 3454 s = 57.6 min (docs/results-real.md), a thin margin
# under the hour. 800 iterations (the previous default) made it ~70 min. Models small
# enough get the paper's schedule (the bundled 28-px model: 3000 x 32).
DEFAULT_WORK_MACS = 600 * CPU_BATCH * 6.12e9
MAX_LR_FACTOR = 15.0  # lr_factor's cap: the largest the unit probe measured (200 iterations)


def model_macs(qmodel: nn.Module, image: torch.Tensor) -> int:
    """Multiply-accumulates of one image through the float model (linear layers, convolutions, attention products)."""
    vit.set_enabled(qmodel, False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            qmodel(image[:1])
    finally:
        vit.set_enabled(qmodel, True)
    return counter.get_total_flops() // 2


def default_iters(macs_per_image: float, batch_size: int) -> int:
    """As many iterations as DEFAULT_WORK_MACS buys at this model's cost and batch size (to the nearest
    10), between 10 and the paper's 3000. The same for a model on every machine."""
    affordable = round(DEFAULT_WORK_MACS / (max(1.0, macs_per_image) * batch_size) / 10) * 10
    return max(10, min(PAPER_ITERS, affordable))


def default_schedule(config: AdfqConfig, macs_per_image: float) -> AdfqConfig:
    """`config` with its unset iters / batch_size filled in (AdfqConfig says the rule)."""
    iters, batch = config.iters, config.batch_size
    paper = config.device != "cpu" or iters is not None
    if batch is None:
        fits = default_iters(macs_per_image, PAPER_BATCH) >= PAPER_ITERS
        batch = PAPER_BATCH if paper or fits else CPU_BATCH
    if iters is None:
        iters = PAPER_ITERS if paper else default_iters(macs_per_image, batch)
    return replace(config, iters=iters, batch_size=batch)


def lr_factor(config: AdfqConfig) -> float:
    """What weight_lr and act_lr are multiplied by: 3000 / iters (at most 15) below the paper's iterations."""
    if not config.scale_lr or config.iters >= PAPER_ITERS:
        return 1.0
    return min(MAX_LR_FACTOR, PAPER_ITERS / max(1, config.iters))


def adfq_factory(config: AdfqConfig):
    bits_for = layer_bits(config)
    ste = config.round_gradient == "ste"

    def make(op: str, role: str) -> Quantizer:
        w_bits, a_bits = bits_for(op)
        if role == "weight":
            return UniformQuantizer(w_bits, signed=False, granularity="channel", init=config.weight_init)
        if op.endswith(".qkv"):
            return PerPatchOutlierQuantizer(a_bits, config.qkv_threshold, round_gradient=ste)
        if op.endswith(".fc1"):
            return PerPatchOutlierQuantizer(a_bits, fc1_threshold(config.fc1_threshold, a_bits), round_gradient=ste)
        if op.endswith(".fc2") and gelu_quantizer(config.gelu_quantizer, a_bits) == "shift-log2":
            return ShiftLog2Quantizer(a_bits, log_steps_per_octave(config.log_base, a_bits, "gelu"),
                                      init=config.gelu_init, round_gradient=ste)
        if op.endswith(".av") and role == "a":
            return LogQuantizer(a_bits, log_steps_per_octave(config.log_base, a_bits, "probabilities"))
        return UniformQuantizer(a_bits, signed=False, granularity="tensor",
                                init=uniform_init(config.uniform_init, a_bits))

    return make


# From this activation width on, "auto" takes a uniform fc2 input and min/max ranges (below).
UNIFORM_FROM_BITS = 8


def gelu_quantizer(choice: str, bits: int) -> str:
    """The fc2 input's quantizer at `bits`: "shift-log2" or "uniform" (AdfqConfig.gelu_quantizer).

    "auto" keeps the paper's Shift-Log2 below 8 bits and takes a uniform min/max code at 8. The real
    model's fc2 inputs have a few values far above their 99.999% quantile (one block: 13.6 against
    2.5, on a few tokens); Shift-Log2 with the code's top level (gelu_init="mse") sits near that
    quantile and clips them, while 256 uniform steps over the whole range stay fine enough (0.05
    there). This rule was chosen against that top level; the default is now the maximum
    (AdfqConfig.gelu_init, chosen below 8 bits), and the uniform code stays at 8 for its cost.
    Real model, 512 validation images, before reconstruction (tools/quantizer_ablation.py;
    docs/ablation/adfq-W8A8-shift-log2-mse.md and adfq-W8A8-q-fc2.md): the fc2 input alone 76.76%
    agreement with the float model (9.8 dB) as Shift-Log2, 97.46% (26.2 dB) uniform; every quantizer
    on 70.70% top-1 (float 78.71%) before both 8-bit choices, 78.52% (96.09% agreement, 22.2 dB)
    with them. The uniform code also makes fc2 one int8 GEMM instead of four byte planes
    (vitq::log_linear).
    """
    if choice == "auto":
        return "uniform" if bits >= UNIFORM_FROM_BITS else "shift-log2"
    return choice


# At this activation width and below, fc1_threshold's default keeps fc1 inputs above 5 float, not above 10.
NARROW_FC1_BITS = 4


def fc1_threshold(choice: float | None, bits: int) -> float:
    """PPOQ's outlier magnitude for an fc1 input of `bits` bits (AdfqConfig.fc1_threshold).

    None takes 5 (the ADFQ-ViT code's `--outlier 5`) at 4 bits and below, 10 (its README command's)
    above. The real model's fc1 inputs hold 0.8-2.7% of values above 5 per block and 0.03-0.4% above
    10. With 10, a 4-bit per-token range either spans the values between 5 and 10 (steps near 1,
    against inliers mostly below 2) or clips them. Every fc1 input alone at 4 bits, the rest float,
    256 validation images (tools/ppoq_threshold.py, docs/validation/ppoq-threshold.md): threshold 10
    gives 14.6 dB and 87.5% agreement with the float model, 5 gives 18.5 dB and 93.8% (largest
    outlier share 0.40% -> 2.74%). After reconstruction, the default W4A4 build on the same 1,000
    validation images as the one with 10 (same calibration images and arithmetic): 70.70% top-1,
    77.50% agreement, 7.31 dB (largest outlier share 2.86%) against 69.30%, 75.00%, 7.18 dB
    (docs/validation/adfq-w4-fc1-5.md; layer-norm-f32-adfq-W4A4.md, "LayerNorm in float32"). Above 4
    bits 10 stays: 6-bit fc1 inputs alone gain too (24.4 -> 30.6 dB), but no W6A6 or W8A8 build has
    been measured with 5, and at 8 bits the larger sparse correction costs device time.
    """
    if choice is not None:
        return float(choice)
    return 5.0 if bits <= NARROW_FC1_BITS else 10.0


def uniform_init(choice: str, bits: int) -> str:
    """How the per-tensor uniform activation quantizers take their range at `bits` (AdfqConfig.uniform_init).

    "auto" keeps the code's MSE search below 8 bits and takes the observed min/max at 8: at 256
    levels the MSE optimum clips the rare large q / k / v values that attention depends on. Real
    model, q, k, v alone, same split and files as above: MSE ranges 95.70% agreement (24.6 dB),
    min/max 98.83% (32.7 dB).
    """
    if choice == "auto":
        return "minmax" if bits >= UNIFORM_FROM_BITS else "mse"
    return choice


def log_steps_per_octave(log_base: str, bits: int, role: str) -> int:
    """k of a log quantizer's levels delta * 2^(-q/k); `role` is "probabilities" (softmax output, the
    A @ V operand) or "gelu" (Shift-Log2, the fc2 input).

    The ADFQ-ViT code's log-sqrt2 (k = 2) has 2^b levels delta * 2^(-q/2), q = 0 .. 2^b - 1
    (at 4 bits down to 2^-7.5, at 8 bits to 2^-127.5), plus an exact zero below them: 2^b + 1
    values, one more than b bits hold. Ours gives the last code to exact zero, so 2^b - 1
    levels and zero fit in b bits: the ladder spans (2^b - 1) / k octaves below delta.
    "auto" spends the bits per role, each rule chosen on a validation split:
      post-GELU      k = 2^(bits-3) (2 at 4 bits, 8 at 6, 32 at 8): about 8 octaves at every
                     width, extra bits buy finer steps. Bundled model, W8A8 before reconstruction
                     (tools/accuracy_table.py --split val): agreement 98.75% at k = 2, 99.70% at
                     k = 32; real model, fc2 input alone (tools/quantizer_ablation.py --groups
                     fc2): W6A6 76.95% at k = 8, 75.98% at k = 4; W4A4 71.68% at k = 2, 69.73%
                     at k = 1.
      probabilities  k = 2^(bits-4) (1 at 4 bits, 4 at 6, 16 at 8): about 16 octaves. A 224-px
                     ViT-S attends over 257 tokens (mean probability 2^-8), so 8 octaves zeroed
                     most of a diffuse head's mass. Real model, probabilities alone (tools/
                     quantizer_ablation.py --groups probabilities, 512 validation images): W6A6
                     agreement 70.70% at k = 8, 97.07% at k = 4, 97.27% at k = 2 (with every
                     quantizer on: 57.62%, 65.62%, 63.09% top-1: k = 4 best); W4A4 58.59% at
                     k = 2, 93.16% at k = 1; W8A8 74.61% at k = 32, 99.80% at k = 16 (every
                     quantizer on: 64.06% and 70.70% top-1).
    "sqrt2" (k = 2, the code's) and "2" (k = 1, the paper's text) fix k for both roles.
    """
    if role not in ("probabilities", "gelu"):
        raise ValueError(f"log ladder role '{role}': use probabilities or gelu")
    if log_base == "auto":
        return max(1, 2 ** (bits - (4 if role == "probabilities" else 3)))
    if log_base in ("sqrt2", "2"):
        return 2 if log_base == "sqrt2" else 1
    raise VitqError(f"unknown log_base '{log_base}': use auto, sqrt2 or 2")


def units(qmodel: nn.Module) -> list[str]:
    names = ["patch_embed.proj"]
    for i in range(len(qmodel.blocks)):
        names += [f"blocks.{i}.attn", f"blocks.{i}.mlp"]
    if isinstance(qmodel.head, vit.QuantLinear):
        names.append("head")
    return names


def _unit_ops(unit: nn.Module) -> list[vit.QuantOp]:
    return [m for m in unit.modules() if isinstance(m, vit.QuantLinear | vit.QuantConv2d | vit.QuantMatMul)]


def _set_unit_enabled(unit: nn.Module, on: bool) -> None:
    for m in unit.modules():
        if isinstance(m, Quantizer):
            m.enabled = on


class _AttentionMaps:
    """Collects the (quantized) attention probabilities entering A @ V."""

    def __init__(self, unit: nn.Module) -> None:
        self.maps: list[torch.Tensor] = []
        self.handle = unit.av.a_quant.register_forward_hook(lambda m, args, out: self.maps.append(out))

    def pop(self) -> torch.Tensor:
        out = self.maps[-1]
        self.maps.clear()
        return out

    def close(self) -> None:
        self.handle.remove()


@torch.no_grad()
def _float_targets(unit: nn.Module, x: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The unit's float output (and float attention maps) on its float input.

    Through torch's GELU and softmax (`arithmetic("fake-quant")`), as the reconstruction's own
    forward computes them: the kernels' bit-exact definitions would only cost time here.
    """
    _set_unit_enabled(unit, False)
    maps = _AttentionMaps(unit) if isinstance(unit, vit.QuantAttention) else None
    outs, probs = [], []
    with vit.arithmetic("fake-quant"):
        for b in batches(x, batch_size):
            outs.append(unit(b))
            if maps is not None:
                probs.append(maps.pop())
    if maps is not None:
        maps.close()
    _set_unit_enabled(unit, True)
    return torch.cat(outs), torch.cat(probs) if probs else None


def _learned_scales(unit: nn.Module, matmul_scales: str) -> list[nn.Parameter]:
    """Scales of the qkv / proj / fc1 / fc2 input quantizers (ADFQ-ViT learns only these), and with
    matmul_scales "learned" those of q, k and v (AdfqConfig.matmul_scales)."""
    quantizers = [op.input_quant for op in (getattr(unit, n, None) for n in ("qkv", "proj", "fc1", "fc2"))
                  if op is not None]
    if matmul_scales == "learned" and isinstance(unit, vit.QuantAttention):
        quantizers += [unit.qk.a_quant, unit.qk.b_quant, unit.av.b_quant]
    params = []
    for q in quantizers:
        p = q.delta if isinstance(q, ShiftLog2Quantizer | LogQuantizer) else q.scale
        p.requires_grad_(True)
        params.append(p)
    return params


def reconstruct_unit(unit: nn.Module, x_fp: torch.Tensor, x_q: torch.Tensor, config: AdfqConfig,
                     generator: torch.Generator, label: str) -> dict:
    """Optimise one unit's rounding and activation scales; returns its loss before/after."""
    y_fp, p_fp = _float_targets(unit, x_fp, config.batch_size * 8)
    rounders = []
    for op in _unit_ops(unit):
        if isinstance(op, vit.QuantLinear | vit.QuantConv2d):
            op.weight_quant = AdaRoundQuantizer(op.weight_quant, op.weight).to(op.weight.device)
            rounders.append(op.weight_quant)
    scales = _learned_scales(unit, config.matmul_scales) if isinstance(unit, vit.QuantAttention | vit.QuantMlp) else []
    opt_w = torch.optim.Adam([r.alpha for r in rounders], lr=config.weight_lr * lr_factor(config))
    opt_a = torch.optim.Adam(scales, lr=config.act_lr * lr_factor(config)) if scales else None
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_a, T_max=config.iters, eta_min=0) if opt_a else None
    maps = _AttentionMaps(unit) if p_fp is not None else None
    kl_dim = 1 if config.kl_dim == "heads" else -1
    if p_fp is not None:  # the float side of the KL once, not per batch (13 M values per batch at 224 px)
        kl_target = torch.cat([attention_kl_target(c, config.temperature, kl_dim) for c in p_fp.split(256)])
        del p_fp
    warmup = int(WARMUP * config.iters)
    history = []
    n = len(x_fp)
    with vit.arithmetic("fake-quant"):  # differentiable: the kernels' arithmetic has no gradient
        for it in progress(range(config.iters), label, unit="it", log=False):  # the unit clock logs
            idx = torch.randint(0, n, (min(config.batch_size, n),), generator=generator).to(x_fp.device)
            xf, xq = x_fp[idx], x_q[idx]
            keep_float = torch.rand(xf.shape, generator=generator).to(xf.device) < config.drop_prob
            out = unit(torch.where(keep_float, xf, xq))
            rec = (out - y_fp[idx]).pow(2).sum(-1).mean()
            loss = rec
            if maps is not None:
                loss = loss + config.kl_weight * attention_kl(maps.pop(), kl_target[idx], config.temperature, kl_dim)
            if it >= warmup:
                progress_frac = (it - warmup) / max(1, config.iters - warmup)
                beta = BETA_END + 0.5 * (BETA_START - BETA_END) * (1 + math.cos(math.pi * progress_frac))
                loss = loss + config.round_weight * sum(r.regularizer(beta) for r in rounders)
            opt_w.zero_grad()
            if opt_a:
                opt_a.zero_grad()
            loss.backward()
            opt_w.step()
            if opt_a:
                opt_a.step()
                sched.step()
                _keep_scales_positive(scales)
            if it == 0 or it == config.iters - 1:
                history.append(round(rec.item(), 6))
    if maps is not None:
        maps.close()
    for r in rounders:
        r.harden()
    for p in scales:
        p.requires_grad_(False)
    return {"reconstruction_loss_first_last": history}


@torch.no_grad()
def _keep_scales_positive(scales: list[nn.Parameter]) -> None:
    for p in scales:
        p.clamp_(min=1e-8)


def bake_weights(qmodel: nn.Module) -> None:
    """Replace AdaRound by its result: the weight becomes its dequantized integer codes,
    quantized again by the plain uniform quantizer (idempotent), so the model carries
    no rounding variables."""
    for _, op in vit.quant_ops(qmodel):
        if isinstance(op, vit.QuantLinear | vit.QuantConv2d) and isinstance(op.weight_quant, AdaRoundQuantizer):
            with torch.no_grad():
                op.weight.copy_(op.weight_quant(op.weight))
            op.weight_quant = op.weight_quant.base


@register_recipe(AdfqConfig)
def quantize_adfq(model: nn.Module, config: AdfqConfig, calib: Iterable[torch.Tensor],
                  example_inputs: tuple) -> QuantizedModel:
    device = resolve_device(config.device)
    x = stack_calibration(calib).to(device)
    # Adam's moments of saturated AdaRound variables decay into denormal floats, which
    # slow x86 arithmetic ~10x (measured: 26 -> 2.6 it/s late in a W4A4 run); flushing
    # them to zero changes nothing they could contribute.
    flush = torch.set_flush_denormal(True)
    try:
        return _quantize_adfq(model, config, x, device)
    finally:
        if flush:
            torch.set_flush_denormal(False)


def _quantize_adfq(model: nn.Module, config: AdfqConfig, x: torch.Tensor, device: torch.device) -> QuantizedModel:
    # the threshold the build used goes into its recorded settings (uniform widths: one fc1 input width)
    config = replace(config, fc1_threshold=fc1_threshold(config.fc1_threshold, parse_bits(config.bits)[1]))
    qmodel = vit.quantize_vit(model, adfq_factory(config)).to(device)
    if config.iters is None or config.batch_size is None:
        config = default_schedule(config, model_macs(qmodel, x))
    sequential = config.act_calibration == "sequential"
    if not sequential:
        vit.calibrate_activations(qmodel, batches(x, config.batch_size * 8))
    generator = torch.Generator().manual_seed(config.seed)
    log = {}
    if config.iters > 0 or sequential:
        names = units(qmodel)
        # Each unit's input on the float model and on the model quantized up to it, from caches of
        # the two residual streams (one block forward per block, not the model's prefix per unit).
        float_inputs = BlockInputs(qmodel, x, config.batch_size * 8)
        quant_inputs = BlockInputs(qmodel, x, config.batch_size * 8)
        clock = StageClock("adfq", len(names))
        for i, name in enumerate(names):
            clock.begin(name)
            unit = qmodel.get_submodule(name)
            vit.set_enabled(qmodel, False)
            (x_fp,) = float_inputs.of(name, unit)
            for earlier in names[:i]:
                _set_unit_enabled(qmodel.get_submodule(earlier), True)
            (x_q,) = quant_inputs.of(name, unit)
            if sequential:  # this unit's activation ranges from the inputs the quantized model gives it
                vit.calibrate_activations(unit, batches(x_q, config.batch_size * 8))
            _set_unit_enabled(unit, True)
            if config.iters > 0:
                log[name] = reconstruct_unit(unit, x_fp, x_q, config, generator, f"reconstructing {name}")
        vit.set_enabled(qmodel, True)
    bake_weights(qmodel)
    outliers = {n: round(q.outlier_fraction, 6) for n, q in vit.quantizers(qmodel)
                if isinstance(q, PerPatchOutlierQuantizer)}
    return package(qmodel, config, {"reconstruction": log, "iters": config.iters, "batch_size": config.batch_size,
                                    "lr_factor": lr_factor(config),
                                    "outlier_fraction": outliers})
