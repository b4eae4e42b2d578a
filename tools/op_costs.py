#!/usr/bin/env python3
"""What each vitq:: op of one transformer block costs on the emulated Pis: one-op programs, counted.

    python tools/op_costs.py                                   # DeiT-Tiny block, minmax W8A8, Pi 4 and Pi 5
    python tools/op_costs.py --tokens 257 --width 384 --heads 6 --mlp 1536 --recipe adfq --bits W8A8 \\
        --outliers 0.024                                       # the real ViT-S/14's block, adfq

Builds a one-op `.pte` for every vitq:: call of a block of a ViT with these shapes, runs
each with vitq-runner under qemu with one thread, and prints the guest instructions per
call and per block (the qemu plugin's counts: exact and repeatable). This is where a whole
program's count (`vitq-edge bench --device emulated-rpi4`) goes, op by op; the rest of a
program is XNNPACK's float glue (residual adds, class token, position embedding) and the
patch embedding and head.

--recipe minmax: the ops and code ranges of the `minmax` program: unsigned input codes per
tensor, per-channel symmetric weights, uniform probabilities, GELU fused into fc2's linear.
--recipe adfq: ADFQ-ViT's: PPOQ on the qkv and fc1 inputs (codes per token, the values
above a threshold kept in float and added back by a sparse correction; --outliers sets the
share above it, e.g. the share the real model's calibration found), asymmetric weights,
log-coded probabilities and GELU into fc2 as the recipe chooses at that width (its
quant/adfq.py decisions: Shift-Log2 codes below 8 bits, vitq::gelu_shift_log2 +
vitq::log_linear; uniform codes at 8, GELU fused into fc2's vitq::linear). For the PPOQ ops
a second count without outliers gives the sparse correction's cost.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import vitq_edge  # noqa: F401  (fixes the torchvision import before timm loads)
from vitq_edge.device import get_device
from vitq_edge.device.base import RunRequest
from vitq_edge.errors import VitqError
from vitq_edge.lifetime import run_script
from vitq_edge.lower import ops  # noqa: F401  (torch.ops.vitq)
from vitq_edge.lower.one_op import one_op_program
from vitq_edge.lower.ops.linear import PROLOGUE_GELU, PROLOGUE_LAYER_NORM, PROLOGUE_NONE, pack_int4
from vitq_edge.lower.ops.log_linear import gelu_then_log_linear
from vitq_edge.quant import arith
from vitq_edge.quant.adfq import gelu_quantizer, log_steps_per_octave

EPS = 1e-6


def weight_args(k: int, n: int, bits: int, symmetric: bool, gen: torch.Generator) -> list:
    """weight, weight_scale, weight_zero, bias of a per-channel quantized layer."""
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    w = torch.randint(lo, hi + 1, (n, k), generator=gen, dtype=torch.int8)
    zero = torch.zeros(n) if symmetric else torch.randint(lo // 2, hi // 2 + 1, (n,), generator=gen).float()
    return [pack_int4(w) if bits <= 4 else w, torch.rand(n, generator=gen) * 0.02 + 1e-3, zero,
            torch.randn(n, generator=gen)]


def linear_args(k: int, n: int, prologue: int, gen: torch.Generator) -> list:
    """minmax W8A8: 8-bit symmetric weights, unsigned 8-bit codes per tensor."""
    norm = (torch.randn(k, generator=gen), torch.randn(k, generator=gen)) if prologue == PROLOGUE_LAYER_NORM \
        else (torch.zeros(0), torch.zeros(0))
    return [*weight_args(k, n, 8, True, gen), torch.tensor([0.03]), torch.tensor([128.0]), 0, 255, 0.0, 8,
            prologue, norm[0], norm[1], EPS]


def minmax_block(tokens: int, width: int, heads: int, mlp: int, gen: torch.Generator) -> list[tuple]:
    """(name, op, input, args, args without outliers or None) of each vitq:: call of a minmax W8A8 block."""
    lin, att = torch.ops.vitq.linear, torch.ops.vitq.attention
    uniform = [0.05, 128, 0, 255]

    def x(k: int) -> torch.Tensor:
        return torch.randn(1, tokens, k, generator=gen) * 2

    return [
        ("norm1 + qkv", lin, x(width), linear_args(width, 3 * width, PROLOGUE_LAYER_NORM, gen), None),
        ("attention", att, x(3 * width),
         [heads, (width // heads) ** -0.5, *uniform, *uniform, *uniform, 1 / 255, 0, 0, 255, 0, 0], None),
        ("proj", lin, x(width), linear_args(width, width, PROLOGUE_NONE, gen), None),
        ("norm2 + fc1", lin, x(width), linear_args(width, mlp, PROLOGUE_LAYER_NORM, gen), None),
        ("gelu + fc2", lin, x(mlp), linear_args(mlp, width, PROLOGUE_GELU, gen), None),
    ]


def ppoq_args(x: torch.Tensor, n: int, bits: int, outliers: float, gen: torch.Generator) -> tuple[list, list]:
    """A LayerNorm + linear with PPOQ codes: per-token ranges of the inliers, the top `outliers` share of
    |LayerNorm(x)| above the threshold. Returns the arguments with and without the outliers."""
    k = x.shape[-1]
    norm_w, norm_b = torch.randn(k, generator=gen), torch.randn(k, generator=gen)
    y = arith.layer_norm(x, norm_w, norm_b, EPS)[0]
    threshold = float(torch.quantile(y.abs().flatten(), 1 - outliers)) if outliers > 0 else 0.0
    kept = y.masked_fill(y.abs() > threshold, 0.0) if threshold > 0 else y
    lo, hi = kept.min(-1).values.clamp(max=0), kept.max(-1).values.clamp(min=0)
    scale, zero = arith.asymmetric_params(lo, hi, bits)
    w = weight_args(k, n, bits, False, gen)
    common = [0, 2**bits - 1]
    tail = [bits, PROLOGUE_LAYER_NORM, norm_w, norm_b, EPS]
    return ([*w, scale, zero, *common, threshold, *tail], [*w, scale, zero, *common, 0.0, *tail])


def adfq_block(tokens: int, width: int, heads: int, mlp: int, bits: int, outliers: float,
               gen: torch.Generator) -> list[tuple]:
    """(name, op, input, args, args without outliers or None) of each vitq:: call of an adfq block."""
    lin, att = torch.ops.vitq.linear, torch.ops.vitq.attention
    qmax = 2**bits - 1
    uniform = [0.05, qmax // 2 + 1, 0, qmax]
    x_qkv, x_att = torch.randn(1, tokens, width, generator=gen) * 2, torch.randn(1, tokens, 3 * width, generator=gen)
    x_proj, x_fc1 = torch.randn(1, tokens, width, generator=gen), torch.randn(1, tokens, width, generator=gen) * 2
    x_fc2 = torch.randn(1, tokens, mlp, generator=gen) * 2
    qkv, qkv_plain = ppoq_args(x_qkv, 3 * width, bits, outliers, gen)
    fc1, fc1_plain = ppoq_args(x_fc1, mlp, bits, outliers, gen)
    proj = [*weight_args(width, width, bits, False, gen), torch.tensor([0.03]), torch.tensor([float(qmax // 2 + 1)]),
            0, qmax, 0.0, bits, PROLOGUE_NONE, torch.zeros(0), torch.zeros(0), EPS]
    prob_steps = log_steps_per_octave("auto", bits, "probabilities")
    if gelu_quantizer("auto", bits) == "uniform":
        fc2 = ("gelu + fc2 (uniform codes)", lin, x_fc2,
               [*weight_args(mlp, width, bits, False, gen), torch.tensor([0.03]), torch.tensor([6.0]), 0, qmax,
                0.0, bits, PROLOGUE_GELU, torch.zeros(0), torch.zeros(0), EPS], None)
    else:
        shift = 0.17  # about -min GELU: Shift-Log2's inputs are positive
        delta = float(arith.gelu(x_fc2).max()) + shift
        fc2_steps = log_steps_per_octave("auto", bits, "gelu")
        gelu_args = [shift, delta, bits, fc2_steps]
        fc2 = ("gelu + fc2 (Shift-Log2, log_linear)", lambda v, *a: gelu_then_log_linear(v, gelu_args, *a), x_fc2,
               [*weight_args(mlp, width, bits, False, gen), delta, bits, fc2_steps, bits], None)
    return [
        ("norm1 + qkv (PPOQ)", lin, x_qkv, qkv, qkv_plain),
        ("attention (log probabilities)", att, x_att,
         [heads, (width // heads) ** -0.5, *uniform, *uniform, *uniform, 1.0, 0, 0, 0, bits, prob_steps], None),
        ("proj", lin, x_proj, proj, None),
        ("norm2 + fc1 (PPOQ)", lin, x_fc1, fc1, fc1_plain),
        fc2,
    ]


def count(device: str, op, x: torch.Tensor, args: list, work: Path) -> int:
    pte, inputs = work / "op.pte", work / "x.npy"
    pte.write_bytes(one_op_program(op, x, args))
    np.save(inputs, x.numpy())
    with get_device(device).session(pte) as session:
        result = session.run(RunRequest(inputs=[inputs], warmup=1, runs=1, threads=1, count_instructions=True))
    return int(result.instructions["per_inference"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=197)
    ap.add_argument("--width", type=int, default=192)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--mlp", type=int, default=768)
    ap.add_argument("--blocks", type=int, default=12, help="blocks of the model, for the per-model column")
    ap.add_argument("--recipe", choices=["minmax", "adfq"], default="minmax")
    ap.add_argument("--bits", default="W8A8", help="adfq: W8A8, W6A6 or W4A4 (weights and activations alike)")
    ap.add_argument("--outliers", type=float, default=0.0,
                    help="adfq: share of post-LayerNorm values PPOQ keeps in float (e.g. 0.024)")
    ap.add_argument("--devices", default="emulated-rpi4,emulated-rpi5")
    args = ap.parse_args()
    if args.bits not in ("W8A8", "W6A6", "W4A4"):
        raise VitqError(f"--bits {args.bits}: choose W8A8, W6A6 or W4A4")
    if not 0.0 <= args.outliers < 0.5:
        raise VitqError(f"--outliers {args.outliers}: give a share in [0, 0.5), e.g. 0.024")
    bits = int(args.bits[1])
    devices = args.devices.split(",")
    gen = torch.Generator().manual_seed(0)
    if args.recipe == "minmax":
        block = minmax_block(args.tokens, args.width, args.heads, args.mlp, gen)
        what = "minmax W8A8"
    else:
        block = adfq_block(args.tokens, args.width, args.heads, args.mlp, bits, args.outliers, gen)
        what = f"adfq {args.bits}, PPOQ outliers {100 * args.outliers:.2f}% of post-LayerNorm values"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, op, x, op_args, plain_args in block:
            counts = [count(d, op, x, op_args, Path(tmp)) for d in devices]
            plain = [count(d, op, x, plain_args, Path(tmp)) for d in devices] if plain_args else None
            rows.append((name, counts, plain))
            print(f"{name}: " + ", ".join(f"{d} {c / 1e6:.2f} M" for d, c in zip(devices, counts, strict=True)),
                  file=sys.stderr)
    print(f"# vitq:: ops of one block ({what}): {args.tokens} tokens, width {args.width}, {args.heads} heads, "
          f"MLP {args.mlp}; M guest instructions per call (x {args.blocks} blocks)\n")
    print("| op | " + " | ".join(f"{d} | x {args.blocks}" for d in devices) + " |")
    print("|---|" + "---:|---:|" * len(devices))
    total = [sum(r[1][i] for r in rows) for i in range(len(devices))]
    for name, counts, _ in [*rows, ("block", total, None)]:
        print(f"| {name} | " + " | ".join(f"{c / 1e6:.2f} | {c * args.blocks / 1e6:.1f}" for c in counts) + " |")
    corrections = [(name, [c - p for c, p in zip(counts, plain, strict=True)]) for name, counts, plain in rows if plain]
    if corrections and args.outliers > 0:
        print("\nPPOQ's sparse float correction (the count with outliers minus the count without): "
              + "; ".join(f"{name}: " + ", ".join(f"{d} {c / 1e6:.2f} M ({100 * c / t:.1f}% of the block)"
                                                  for d, c, t in zip(devices, diff, total, strict=True))
                          for name, diff in corrections))


if __name__ == "__main__":
    run_script(main)
