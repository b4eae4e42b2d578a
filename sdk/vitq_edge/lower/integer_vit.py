"""The integer program of a quantized ViT: the module `torch.export` sees for paper recipes.

`integer_vit(qmodel)` turns the simulated model of `quant/vit.py` into one whose
quantized layers call the `vitq::` ops (lower/ops/) on integer weights:

    patch_embed           patches (reshape) -> vitq::linear
    blocks.i  norm1+qkv   vitq::linear (LayerNorm fused, per-tensor or per-token codes,
                          PPOQ outliers) -> vitq::attention -> vitq::linear (proj)
              norm2+fc1   vitq::linear (LayerNorm fused)
              gelu+fc2    vitq::linear (GELU fused, uniform codes) or
                          vitq::gelu_shift_log2 -> vitq::log_linear (ADFQ-ViT's Shift-Log2)
    norm+head             vitq::linear (LayerNorm fused; class-token pooling)

What remains is float glue that XNNPACK takes: class token / position embedding, the
residual adds. Each op computes what the simulation computes, with the float sums of
quantized values replaced by integer sums scaled once. Whether a layer can take this path
is decided in one place, `vit.why_not_integer`, which the simulation's integer path also
follows; `NotLowerable` carries its answer (e.g. a quantizer left off, or codes wider than
8 bits), or a structure the fused ops do not cover.
"""

from __future__ import annotations

import copy

import torch
from timm.layers import PatchEmbed
from torch import nn

from vitq_edge.lower import ops  # noqa: F401  (registers torch.ops.vitq)
from vitq_edge.lower.ops.linear import PROLOGUE_GELU, PROLOGUE_LAYER_NORM, PROLOGUE_NONE, pack_int4
from vitq_edge.lower.ops.log_linear import gelu_then_log_linear
from vitq_edge.quant import vit
from vitq_edge.quant.quantizers import (
    AdaRoundQuantizer,
    PerPatchOutlierQuantizer,
    ShiftLog2Quantizer,
)


class NotLowerable(Exception):
    """The quantized model has something the integer kernels do not implement."""


def _require(why_not: str | None) -> None:
    """Raise NotLowerable with the reason, where there is one."""
    if why_not:
        raise NotLowerable(why_not)


def _f32(t: torch.Tensor) -> float:
    return float(t.detach().float())


def weight_integers(op: vit.QuantLinear | vit.QuantConv2d, path: str) -> dict[str, torch.Tensor | int]:
    """The weight as vitq::linear takes it: integers w', scale and zero per output channel.
    The caller has checked the layer with `vit.why_not_integer`."""
    wq = op.weight_quant
    base = wq.base if isinstance(wq, AdaRoundQuantizer) else wq
    w, zero, scale = vit.weight_integer_form(op)
    lo, hi = -(2 ** (base.bits - 1)), 2 ** (base.bits - 1) - 1
    if not (bool(torch.all(w == torch.round(w))) and lo <= int(w.min()) and int(w.max()) <= hi):
        raise NotLowerable(f"{path}'s weight codes are not {base.bits}-bit integers")
    w = w.to(torch.int8)
    packed = pack_int4(w) if base.bits <= 4 else w
    return {"weight": packed, "weight_scale": scale, "weight_zero": zero, "weight_bits": base.bits}


def _bias(op: nn.Module, n: int) -> torch.Tensor:
    return op.bias.detach().float().clone() if op.bias is not None else torch.zeros(n)


class IntLinear(nn.Module):
    """vitq::linear with this layer's integers and input quantizer (and a fused prologue)."""

    def __init__(self, op: vit.QuantLinear | vit.QuantConv2d, path: str, prologue: int = PROLOGUE_NONE,
                 norm: nn.LayerNorm | None = None, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        _require(vit.why_not_integer(op, path) or vit.why_not_integer_input(op.input_quant, f"{path}'s input"))
        w = weight_integers(op, path)
        self.weight_bits = int(w.pop("weight_bits"))
        for name, t in w.items():
            self.register_buffer(name, t)
        n = self.weight_scale.shape[0]
        self.register_buffer("bias", _bias(op, n) if bias is None else bias)
        iq = op.input_quant
        self.register_buffer("input_scale", iq.scale.detach().float().reshape(-1).clone())
        self.register_buffer("input_zero", iq.zero_point.detach().float().reshape(-1).clone())
        self.qmin, self.qmax = iq.qrange
        self.threshold = iq.threshold if isinstance(iq, PerPatchOutlierQuantizer) else 0.0
        self.prologue = prologue
        if prologue == PROLOGUE_LAYER_NORM:
            if not (isinstance(norm, nn.LayerNorm) and norm.elementwise_affine and norm.bias is not None):
                raise NotLowerable(f"the LayerNorm before {path} is not an affine LayerNorm")
            k = norm.normalized_shape[0]
            self.register_buffer("norm_weight", norm.weight.detach().float().clone())
            self.register_buffer("norm_bias", norm.bias.detach().float().clone())
            self.norm_eps = float(norm.eps)
        else:
            k = 0
            self.register_buffer("norm_weight", torch.zeros(k))
            self.register_buffer("norm_bias", torch.zeros(k))
            self.norm_eps = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.vitq.linear(
            x, self.weight, self.weight_scale, self.weight_zero, self.bias, self.input_scale, self.input_zero,
            self.qmin, self.qmax, self.threshold, self.weight_bits, self.prologue,
            self.norm_weight, self.norm_bias, self.norm_eps)


class IntLogLinear(nn.Module):
    """GELU + Shift-Log2 codes (vitq::gelu_shift_log2), then fc2 on them (vitq::log_linear)."""

    def __init__(self, op: vit.QuantLinear, path: str) -> None:
        super().__init__()
        _require(vit.why_not_integer(op, path))
        iq = op.input_quant
        w = weight_integers(op, path)
        self.weight_bits = int(w.pop("weight_bits"))
        for name, t in w.items():
            self.register_buffer(name, t)
        # fc2's bias carries the un-shift: b - shift * W 1, with W the quantized weight (as simulated).
        self.register_buffer("bias", op.folded_bias(op.quantized_weight().detach(), iq.shift.detach()).float())
        self.shift, self.delta = _f32(iq.shift), _f32(iq.delta)
        self.bits, self.steps_per_octave = iq.bits, iq.steps_per_octave

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_then_log_linear(x, [self.shift, self.delta, self.bits, self.steps_per_octave], self.weight,
                                    self.weight_scale, self.weight_zero, self.bias, self.delta, self.bits,
                                    self.steps_per_octave, self.weight_bits)


class IntAttention(nn.Module):
    """norm1 + qkv (vitq::linear), vitq::attention, proj (vitq::linear)."""

    def __init__(self, attn: vit.QuantAttention, norm: nn.LayerNorm, path: str) -> None:
        super().__init__()
        self.qkv = IntLinear(attn.qkv, f"{path}.qkv", PROLOGUE_LAYER_NORM, norm)
        self.proj = IntLinear(attn.proj, f"{path}.proj")
        self.num_heads, self.scale = attn.num_heads, float(attn.scale)
        _require(attn.why_not_integer(path))
        # The simulation's own parameters (QuantAttention.integer_params), in the op's argument order.
        self.q, self.k, self.v, p_uniform, p_log = attn.integer_params()
        self.p = (p_log[0], 0, 0, 0, *p_log[1:]) if p_log else (*p_uniform, 0, 0)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, **_) -> torch.Tensor:
        if attn_mask is not None:
            raise ValueError("the integer attention has no mask input")
        out = torch.ops.vitq.attention(self.qkv(x), self.num_heads, self.scale, *self.q, *self.k, *self.v, *self.p)
        return self.proj(out)


class IntMlp(nn.Module):
    def __init__(self, mlp: vit.QuantMlp, norm: nn.LayerNorm, path: str) -> None:
        super().__init__()
        if not (isinstance(mlp.act, nn.GELU) and mlp.act.approximate == "none"):
            raise NotLowerable(f"{path} uses {type(mlp.act).__name__}; the kernels fuse exact GELU only")
        self.fc1 = IntLinear(mlp.fc1, f"{path}.fc1", PROLOGUE_LAYER_NORM, norm)
        if isinstance(mlp.fc2.input_quant, ShiftLog2Quantizer):
            self.fc2 = IntLogLinear(mlp.fc2, f"{path}.fc2")
        else:
            self.fc2 = IntLinear(mlp.fc2, f"{path}.fc2", PROLOGUE_GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))


class IntPatchEmbed(nn.Module):
    """The stride = kernel patch convolution as a GEMM over flattened patches."""

    def __init__(self, pe: PatchEmbed) -> None:
        super().__init__()
        conv = pe.proj
        p = conv.weight.shape[-1]
        if not (isinstance(pe, PatchEmbed) and pe.flatten and not getattr(pe, "dynamic_img_pad", False)):
            raise NotLowerable("the patch embedding is not a plain flattening PatchEmbed")
        self.patch, self.norm = p, pe.norm
        self.linear = IntLinear(conv, "patch_embed.proj")
        # What VisionTransformer reads from its patch_embed besides calling it.
        self.num_patches, self.grid_size, self.patch_size = pe.num_patches, pe.grid_size, pe.patch_size
        self.img_size = pe.img_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.patch
        patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return self.norm(self.linear(patches.reshape(b, (h // p) * (w // p), c * p * p)))


def integer_vit(qmodel: nn.Module) -> nn.Module:
    """A copy of the simulated ViT whose quantized layers run the vitq:: integer ops."""
    model = copy.deepcopy(qmodel).eval()
    model.patch_embed = IntPatchEmbed(model.patch_embed)
    for i, blk in enumerate(model.blocks):
        if not (isinstance(blk.norm1, nn.LayerNorm) and isinstance(blk.norm2, nn.LayerNorm)):
            raise NotLowerable(f"block {i} has no LayerNorm to fuse")
        blk.attn = IntAttention(blk.attn, blk.norm1, f"blocks.{i}.attn")
        blk.mlp = IntMlp(blk.mlp, blk.norm2, f"blocks.{i}.mlp")
        blk.norm1 = blk.norm2 = nn.Identity()
    if isinstance(model.head, vit.QuantLinear):
        # With class-token pooling the final LayerNorm matters only for the pooled token: fuse it into head.
        fuse = (model.global_pool == "token" and isinstance(model.fc_norm, nn.Identity)
                and isinstance(model.norm, nn.LayerNorm))
        model.head = IntLinear(model.head, "head", PROLOGUE_LAYER_NORM if fuse else PROLOGUE_NONE,
                               model.norm if fuse else None)
        if fuse:
            model.norm = nn.Identity()
    leftover = [name for name, _ in vit.quant_ops(model)]
    if leftover:
        raise NotLowerable(f"layers without an integer kernel: {', '.join(leftover)}")
    return model
