"""The quantized Vision Transformer: a timm ViT/DeiT whose forward computes what the device computes.

`quantize_vit(model, make_quantizer)` swaps, in a copy of the model:

    patch_embed.proj  Conv2d   -> QuantConv2d   (input, weight)
    blocks.i.attn              -> QuantAttention:
        qkv  QuantLinear (input, weight) ; qk  QuantMatMul (q, k) ; softmax (float) ;
        av   QuantMatMul (attention probabilities, v) ; proj  QuantLinear (input, weight)
    blocks.i.mlp               -> QuantMlp: fc1 QuantLinear ; GELU (float) ; fc2 QuantLinear
    head              Linear   -> QuantLinear
    LayerNorm, GELU            -> KernelLayerNorm, KernelGELU (arith's float definitions)

`make_quantizer(op, role)` picks the quantizer of every operand (`op` is the dotted
path such as "blocks.3.mlp.fc2", `role` is "weight", "input", "a" or "b"), so one
transformation serves every recipe. What stays in float is listed in `FLOAT_OPS`,
the one place the build's manifest reads it from.

By default (`arithmetic("kernel")`) the quantized model runs the kernels' arithmetic:
integer sums scaled once, and LayerNorm, GELU, the probability codes as `arith` defines
them, so the lowered program (lower/integer_vit.py) computes the same floats, bit for
bit, in every layer `why_not_integer` admits (the rule lowering uses too). Calibration and
reconstruction run inside `arithmetic("fake-quant")`: the differentiable fake-quant
forward with torch's own LayerNorm and GELU.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm, Mlp
from timm.layers.attention import Attention
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitq_edge.errors import VitqError
from vitq_edge.quant import arith
from vitq_edge.quant.quantizers import (
    AdaRoundQuantizer,
    LogQuantizer,
    PerPatchOutlierQuantizer,
    Quantizer,
    ShiftLog2Quantizer,
    UniformQuantizer,
)

# The arithmetic that stays float in every paper recipe (as in both papers' simulations, but for the
# softmax: the integer programs code its probabilities from the integer dot products, arith's
# integer_softmax_codes and integer_log_attention; a program lowered as its float simulation, which the
# manifest's program_arithmetic names, keeps torch's).
FLOAT_OPS = [
    "layer_norm",
    "gelu",
    "residual add",
    "attention scale 1/sqrt(head_dim)",
    "class token and position embedding add",
    "bias add",
]

QuantizerFactory = Callable[[str, str], Quantizer]

Arithmetic = Literal["kernel", "fake-quant"]
_arithmetic: Arithmetic = "kernel"


@contextmanager
def arithmetic(mode: Arithmetic) -> Iterator[None]:
    """Which arithmetic the quantized models compute inside the block (like torch.no_grad()).

    "kernel", the default: what the integer kernels compute, bit for bit (integer sums of
    codes, the kernels' LayerNorm and GELU), in every layer whose quantizers allow it
    (`why_not_integer`); inference, whatever the grad mode. Not differentiable.
    "fake-quant": fake quantization around torch's float ops: the same values up to float
    rounding, differentiable, every quantizer module called (hooks see them); calibration
    and reconstruction use it.
    """
    if mode not in ("kernel", "fake-quant"):
        raise ValueError(f"arithmetic is 'kernel' or 'fake-quant', not {mode!r}")
    global _arithmetic
    saved, _arithmetic = _arithmetic, mode
    try:
        yield
    finally:
        _arithmetic = saved


def current_arithmetic() -> Arithmetic:
    return _arithmetic


def kernel_arithmetic() -> bool:
    return _arithmetic == "kernel"


class KernelLayerNorm(nn.LayerNorm):
    """nn.LayerNorm computed as the kernels compute it (arith.layer_norm) when kernel_arithmetic().

    Under autograd (reconstruction) torch's own LayerNorm: the same values up to float
    rounding, and the double-precision definition would slow every training step ~2x.
    """

    @classmethod
    def of(cls, norm: nn.LayerNorm) -> KernelLayerNorm:
        new = cls(norm.normalized_shape, eps=norm.eps, elementwise_affine=norm.elementwise_affine,
                  bias=norm.bias is not None)
        new.load_state_dict(norm.state_dict())
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not kernel_arithmetic() or self.weight is None or self.bias is None
                or len(self.normalized_shape) != 1 or _exporting()):
            return super().forward(x)
        return arith.layer_norm(x, self.weight, self.bias, self.eps)


class KernelGELU(nn.GELU):
    """Exact (erf) GELU; GELU by table as the kernels compute it (arith.gelu_table) when kernel_arithmetic()."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return arith.gelu_table(x) if kernel_arithmetic() and not _exporting() else super().forward(x)


def _exporting() -> bool:
    # A model the integer kernels cannot run is exported as its simulation: standard ops there.
    return torch.compiler.is_exporting()


class QuantLinear(nn.Module):
    """y = Q_w(W) Q_x(x) + b. A Shift-Log2 input is consumed shifted, the un-shift in the bias."""

    def __init__(self, linear: nn.Linear, weight_quant: Quantizer, input_quant: Quantizer) -> None:
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.weight_quant, self.input_quant = weight_quant, input_quant

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quant(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        iq = self.input_quant
        integer = integer_operands(self)
        if integer and not isinstance(iq, ShiftLog2Quantizer):
            return integer_forward(self, x)
        w = self.quantized_weight()
        if isinstance(iq, ShiftLog2Quantizer) and iq.enabled and not iq._observing:
            # The device's fc2: W @ x' + (b - shift * W @ 1).
            bias = self.folded_bias(w, iq.shift)
            if integer:
                levels = arith.log_values(iq.codes(x), iq.delta, iq.bits, iq.steps_per_octave)
                return arith.log_linear(levels, *weight_integer_form(self), bias)
            return F.linear(iq.quantize(x) + iq.shift, w, bias)
        return F.linear(iq(x), w, self.bias)

    def folded_bias(self, w: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        b = -shift * w.sum(1)
        return b if self.bias is None else self.bias + b

    def operands(self) -> tuple[Quantizer, Quantizer]:
        return self.input_quant, self.weight_quant


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), C p p]: the rows a stride = kernel = p convolution multiplies."""
    b, c, h, w = x.shape
    patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // p) * (w // p), c * p * p)


def weight_integer_form(op: QuantLinear | QuantConv2d) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w' [N, K], zero [N], scale [N]) with value = (w' - zero) * scale, w' a signed b-bit integer.

    Unsigned codes are re-centred by 2^(b-1) so they fit the signed GEMM operands; the
    program stores exactly these integers (lower/integer_vit.py), so the simulation and
    the kernels round the same sums.
    """
    wq = op.weight_quant
    base = wq.base if isinstance(wq, AdaRoundQuantizer) else wq
    codes = wq.codes(op.weight.detach()).reshape(op.weight.shape[0], -1)
    n = codes.shape[0]
    offset = 0 if base.signed else 2 ** (base.bits - 1)
    scale = base.scale.detach().float().reshape(-1).expand(n).contiguous()
    zero = base.zero_point.detach().float().reshape(-1).expand(n).contiguous()
    return codes - offset, zero - offset, scale


def _why_not_code(q: Quantizer | AdaRoundQuantizer, what: str) -> str | None:
    if not q.enabled:
        return f"{what} is not quantized"
    if q.bits > arith.MAX_CODE_BITS:
        return f"{what} has {q.bits} bits; the kernels hold codes in {arith.MAX_CODE_BITS} bits"
    if getattr(q, "_observing", False):
        return f"{what} is still observing its range"
    return None


def why_not_integer_weight(op: QuantLinear | QuantConv2d, path: str = "the layer") -> str | None:
    """Why the kernels cannot take op's weight as integer codes (uniform, or hardened AdaRound); None: they can."""
    wq = op.weight_quant
    base = wq.base if isinstance(wq, AdaRoundQuantizer) else wq
    return (_why_not_code(wq, f"{path}'s weight")
            or (None if isinstance(base, UniformQuantizer) else f"{path}'s weight quantizer is not uniform")
            or (f"{path}'s AdaRound rounding is not hardened" if isinstance(wq, AdaRoundQuantizer) and not wq.hard
                else None))


def why_not_integer_input(q: Quantizer, what: str) -> str | None:
    """Why vitq::linear cannot take `q`'s codes (uniform or PPOQ, per tensor or per token); None: it can."""
    return (_why_not_code(q, what)
            or (None if type(q) in (UniformQuantizer, PerPatchOutlierQuantizer) and q.granularity in ("tensor", "token")
                else f"{what}'s quantizer is not uniform per tensor or per token"))


def why_not_integer(op: nn.Module, path: str = "the layer") -> str | None:
    """The one rule: why a quantized layer cannot run on the integer kernels (None: it can).

    The simulation computes a layer in the kernels' arithmetic exactly when this says None
    (and the arithmetic is "kernel"); lower/integer_vit.py refuses to lower it otherwise.
    QuantLinear: integer weight codes, and a uniform / PPOQ input (vitq::linear) or a
    Shift-Log2 input (vitq::gelu_shift_log2 + vitq::log_linear). QuantConv2d: also a plain
    stride = kernel patch convolution. QuantAttention: per-tensor uniform q, k, v with whole
    zero points, and uniform or log probabilities (vitq::attention).
    """
    if isinstance(op, QuantAttention):
        return op.why_not_integer(path)
    if not isinstance(op, QuantLinear | QuantConv2d):
        return f"{path} is a {type(op).__name__}, which has no integer kernel"
    why = why_not_integer_weight(op, path)
    if why:
        return why
    if isinstance(op, QuantConv2d):
        p = op.weight.shape[-1]
        if not (tuple(op.stride) == (p, p) and op.weight.shape[-2] == p and tuple(op.padding) == (0, 0)):
            return f"{path} is not a plain stride = kernel patch convolution"
    iq = op.input_quant
    if isinstance(iq, ShiftLog2Quantizer) and isinstance(op, QuantLinear):
        return _why_not_code(iq, f"{path}'s input")
    return why_not_integer_input(iq, f"{path}'s input")


def integer_operands(op: QuantLinear | QuantConv2d) -> bool:
    """Run op as vitq::linear computes it: "kernel" arithmetic, and the rule allows it.

    Otherwise (calibration and reconstruction, "fake-quant") the float fake-quant forward:
    the same values up to float rounding, and differentiable.
    """
    return kernel_arithmetic() and why_not_integer(op) is None


def integer_forward(op: QuantLinear | QuantConv2d, x: torch.Tensor) -> torch.Tensor:
    iq = op.input_quant
    scale, zero = iq.scale.detach(), iq.zero_point
    if iq.granularity == "token":
        scale, zero = scale.reshape(-1, 1), zero.reshape(-1, 1)
    w_int, w_zero, w_scale = weight_integer_form(op)
    threshold = iq.threshold if isinstance(iq, PerPatchOutlierQuantizer) else 0.0
    qmin, qmax = iq.qrange
    bias = None if op.bias is None else op.bias.detach()
    return arith.quantized_linear(x, scale, zero, qmin, qmax, threshold, w_int, w_zero, w_scale, bias)


class QuantConv2d(nn.Module):
    """The patch embedding convolution with quantized input and per-channel weight."""

    def __init__(self, conv: nn.Conv2d, weight_quant: Quantizer, input_quant: Quantizer) -> None:
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self.stride, self.padding = conv.stride, conv.padding
        self.weight_quant, self.input_quant = weight_quant, input_quant

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quant(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.weight.shape[-1]
        if integer_operands(self):
            # The patch convolution as the device runs it: a GEMM over flattened patches.
            patches = patchify(x, p)
            y = integer_forward(self, patches)
            b, _, h, w = x.shape
            return y.transpose(1, 2).reshape(b, -1, h // p, w // p)
        return F.conv2d(self.input_quant(x), self.quantized_weight(), self.bias, self.stride, self.padding)

    def operands(self) -> tuple[Quantizer, Quantizer]:
        return self.input_quant, self.weight_quant


class QuantMatMul(nn.Module):
    """a @ b with both operands quantized (the two attention matmuls)."""

    def __init__(self, a_quant: Quantizer, b_quant: Quantizer) -> None:
        super().__init__()
        self.a_quant, self.b_quant = a_quant, b_quant

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.a_quant(a) @ self.b_quant(b)

    def operands(self) -> tuple[Quantizer, Quantizer]:
        return self.a_quant, self.b_quant


class QuantAttention(nn.Module):
    """timm's Attention with quantized qkv, q@k^T, attention@v and proj."""

    def __init__(self, attn: Attention, path: str, make: QuantizerFactory) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.attn_dim = attn.num_heads * attn.head_dim
        self.qkv = QuantLinear(attn.qkv, make(f"{path}.qkv", "weight"), make(f"{path}.qkv", "input"))
        self.qk = QuantMatMul(make(f"{path}.qk", "a"), make(f"{path}.qk", "b"))
        self.av = QuantMatMul(make(f"{path}.av", "a"), make(f"{path}.av", "b"))
        self.proj = QuantLinear(attn.proj, make(f"{path}.proj", "weight"), make(f"{path}.proj", "input"))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.integer_operands():
            x = arith.integer_attention(q, k, v, float(self.scale), *self.integer_params())
            return self.proj(x.transpose(1, 2).reshape(b, n, self.attn_dim))
        # The scale is applied to the integer product's float result, not folded into q.
        scores = self.qk(q, k.transpose(-2, -1)) * self.scale
        probs = scores.softmax(dim=-1)
        x = self.av(probs, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, self.attn_dim))


    def integer_operands(self) -> bool:
        """Run the attention as vitq::attention computes it: "kernel" arithmetic, and the rule allows it."""
        return kernel_arithmetic() and self.why_not_integer() is None

    def why_not_integer(self, path: str = "the attention") -> str | None:
        """Why vitq::attention cannot run these q, k, v and probability quantizers (`why_not_integer`)."""
        p = self.av.a_quant
        uniform = {"q": self.qk.a_quant, "k": self.qk.b_quant, "v": self.av.b_quant}
        if isinstance(p, LogQuantizer):
            why = _why_not_code(p, f"{path}'s attention probabilities")
            if why:
                return why
        else:
            uniform["attention probabilities"] = p
        for name, u in uniform.items():
            what = f"{path}'s {name}"
            why = _why_not_code(u, what)
            if why:
                return why
            if not (type(u) is UniformQuantizer and u.granularity == "tensor"):
                return f"{what} is not per-tensor uniform"
            if float(u.zero_point) != round(float(u.zero_point)):
                return f"{what} has a fractional zero point"
        return None

    def integer_params(self) -> tuple:
        """(q, k, v, uniform probability, log probability) parameters of arith.integer_attention."""
        def params(u: UniformQuantizer) -> tuple:
            return (float(u.scale), int(u.zero_point), *u.qrange)

        p = self.av.a_quant
        p_log = (float(p.delta), p.bits, p.steps_per_octave) if isinstance(p, LogQuantizer) else None
        return (params(self.qk.a_quant), params(self.qk.b_quant), params(self.av.b_quant),
                None if p_log else params(p), p_log)


class QuantMlp(nn.Module):
    def __init__(self, mlp: Mlp, path: str, make: QuantizerFactory) -> None:
        super().__init__()
        self.fc1 = QuantLinear(mlp.fc1, make(f"{path}.fc1", "weight"), make(f"{path}.fc1", "input"))
        exact_gelu = type(mlp.act) is nn.GELU and mlp.act.approximate == "none"
        self.act = KernelGELU() if exact_gelu else mlp.act
        self.fc2 = QuantLinear(mlp.fc2, make(f"{path}.fc2", "weight"), make(f"{path}.fc2", "input"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def check_supported(model: nn.Module) -> None:
    """Refuse ViT variants whose extra ops the quantized model would silently drop."""
    if not isinstance(model, VisionTransformer):
        raise VitqError(f"{type(model).__name__} is not a timm VisionTransformer; the paper recipes need ViT/DeiT")
    for i, blk in enumerate(model.blocks):
        attn = blk.attn
        unsupported = (not isinstance(attn, Attention) or not isinstance(attn.q_norm, nn.Identity)
                       or not isinstance(attn.norm, nn.Identity) or getattr(attn, "gate", None) is not None
                       or not isinstance(blk.mlp, Mlp) or not isinstance(blk.mlp.norm, nn.Identity))
        if unsupported:
            raise VitqError(f"block {i} uses attention/MLP options (qk-norm, gating, GLU, scale-norm) the paper "
                            "recipes do not cover; use --recipe xnnpack-int8 for this model")


def quantize_vit(model: nn.Module, make: QuantizerFactory) -> nn.Module:
    """A quantized copy of a timm ViT/DeiT (the float model is left untouched)."""
    check_supported(model)
    qmodel = copy.deepcopy(model).eval()
    pe = qmodel.patch_embed
    pe.proj = QuantConv2d(pe.proj, make("patch_embed.proj", "weight"), make("patch_embed.proj", "input"))
    for i, blk in enumerate(qmodel.blocks):
        blk.attn = QuantAttention(blk.attn, f"blocks.{i}.attn", make)
        blk.mlp = QuantMlp(blk.mlp, f"blocks.{i}.mlp", make)
        blk.norm1, blk.norm2 = _kernel_norm(blk.norm1), _kernel_norm(blk.norm2)
    qmodel.norm, qmodel.fc_norm = _kernel_norm(qmodel.norm), _kernel_norm(qmodel.fc_norm)
    if isinstance(qmodel.head, nn.Linear):
        qmodel.head = QuantLinear(qmodel.head, make("head", "weight"), make("head", "input"))
    for p in qmodel.parameters():
        p.requires_grad_(False)
    init_weight_quantizers(qmodel)
    return qmodel


def _kernel_norm(norm: nn.Module) -> nn.Module:
    return KernelLayerNorm.of(norm) if type(norm) in (nn.LayerNorm, LayerNorm) else norm


QuantOp = QuantLinear | QuantConv2d | QuantMatMul


def quant_ops(model: nn.Module) -> Iterator[tuple[str, QuantOp]]:
    """Every quantized op in forward order, with its dotted path."""
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear | QuantConv2d | QuantMatMul):
            yield name, m


def quantizers(model: nn.Module) -> Iterator[tuple[str, Quantizer]]:
    for name, m in model.named_modules():
        if isinstance(m, Quantizer):
            yield name, m


def init_weight_quantizers(model: nn.Module) -> None:
    for _, op in quant_ops(model):
        if isinstance(op, QuantLinear | QuantConv2d) and isinstance(op.weight_quant, UniformQuantizer):
            op.weight_quant.init_range(op.weight.detach())


def set_enabled(model: nn.Module, on: bool) -> None:
    for _, q in quantizers(model):
        q.enabled = on


# Images per forward when the simulated model is evaluated: with a few, the kernel arithmetic's
# temporaries (the attention's double [B, heads, T, T] maps) stay in cache. The real ViT-S/14 at
# 224 px, 2 threads, seconds per image at 32 / 8 / 4 / 2 / 1 images per forward: minmax W8A8
# 0.64 / 0.17 / 0.15 / 0.16 / 0.20, adfq W4A4 0.61 / 0.26 / 0.28 / 0.30 / 0.34
# (docs/validation/simulation-speed.md).
SIMULATION_IMAGES = 4


@torch.no_grad()
def simulate(model: nn.Module, x: torch.Tensor, images_per_forward: int = SIMULATION_IMAGES) -> torch.Tensor:
    """model(x), a few images at a time: the same logits, since no op mixes images (the integer sums
    are exact whatever range a batch has), in a third of the time of large batches."""
    return torch.cat([model(part) for part in x.split(images_per_forward)])


@torch.no_grad()
def calibrate_activations(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Observe every activation quantizer's input on `batches` (float forward), then set its range.

    The forward is the fake-quant one (torch's LayerNorm, GELU, softmax): the kernels' exact
    definitions agree with them to float rounding and cost several times more. It stops once
    every quantizer has observed all it keeps: the later batches would change nothing (a
    224-px ViT-S block's quantizers fill up on its first batch of 64 images).
    """
    acts = [q for _, q in quantizers(model) if not _is_weight_quantizer(model, q)]
    for q in acts:
        q.observe(True)
    try:
        with arithmetic("fake-quant"):
            for x in batches:
                model(x)
                if all(q.observed_enough for q in acts):
                    break
    finally:
        for q in acts:
            q.observe(False)
    for q in acts:
        q.init_range()
        q.clear_observations()


def _is_weight_quantizer(model: nn.Module, q: Quantizer) -> bool:
    return any(isinstance(op, QuantLinear | QuantConv2d)
               and q in (op.weight_quant, getattr(op.weight_quant, "base", None))
               for _, op in quant_ops(model))


def weight_bits(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{op path: (weight elements, bits)} of every quantized weight."""
    out = {}
    for name, op in quant_ops(model):
        if isinstance(op, QuantLinear | QuantConv2d):
            out[name] = (op.weight.numel(), op.weight_quant.bits)
    return out


def model_size_bytes(model: nn.Module) -> int:
    """Deployed size: quantized weights packed at their bit width, plus float32 for everything else.

    Per-channel scales and zero points, biases, LayerNorm, embeddings and the per-token
    PPOQ parameters count 4 bytes per value.
    """
    quantized = {id(op.weight) for _, op in quant_ops(model) if isinstance(op, QuantLinear | QuantConv2d)}
    # AdaRound's rounding variables are folded into the integer codes: not shipped.
    rounding = {id(m.alpha) for m in model.modules() if isinstance(m, AdaRoundQuantizer)}
    bits = sum(n * b for n, b in weight_bits(model).values())
    other = sum(p.numel() for p in model.parameters() if id(p) not in quantized and id(p) not in rounding)
    for name, buf in model.named_buffers():
        if name.endswith(("zero_point", "shift")):
            other += buf.numel()
    return (bits + 7) // 8 + 4 * other


def describe_quantizers(model: nn.Module) -> dict[str, dict]:
    """What each quantizer is, for the manifest (PPOQ thresholds and outlier fractions included)."""
    out = {}
    for name, op in quant_ops(model):
        entry = {}
        for role, q in zip(("input", "weight") if not isinstance(op, QuantMatMul) else ("a", "b"),
                           op.operands(), strict=True):
            base = q.base if isinstance(q, AdaRoundQuantizer) else q
            entry[role] = {**base.describe(), "enabled": base.enabled}
            if isinstance(q, AdaRoundQuantizer):
                entry[role]["rounding"] = "adaround"
        out[name] = entry
    return out
