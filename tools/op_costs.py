#!/usr/bin/env python3
"""What each vitq:: op of one transformer block costs on the emulated Pis: one-op programs, counted.

    python tools/op_costs.py                                   # DeiT-Tiny block, Pi 4 and Pi 5
    python tools/op_costs.py --tokens 197 --width 384 --heads 6 --devices emulated-rpi4

Builds a one-op `.pte` for every vitq:: call of a block of a ViT with these shapes (the
ops and code ranges of the `minmax` W8A8 program: unsigned 8-bit input codes per tensor,
8-bit per-channel weights, uniform 8-bit probabilities), runs each with vitq-runner
under qemu with one thread, and prints the guest instructions per call and per block
(the qemu plugin's counts: exact and repeatable). This is where a whole program's count
(`vitq-edge bench --device emulated-rpi4`) goes, op by op; the rest of a program is
XNNPACK's float glue (residual adds, class token, position embedding) and the patch
embedding and head.
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
from vitq_edge.lifetime import run_script
from vitq_edge.lower import ops  # noqa: F401  (torch.ops.vitq)
from vitq_edge.lower.one_op import one_op_program
from vitq_edge.lower.ops.linear import PROLOGUE_GELU, PROLOGUE_LAYER_NORM, PROLOGUE_NONE


def linear_args(k: int, n: int, prologue: int, gen: torch.Generator) -> list:
    w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)  # symmetric, as minmax's weights
    norm = (torch.randn(k, generator=gen), torch.randn(k, generator=gen)) if prologue == PROLOGUE_LAYER_NORM \
        else (torch.zeros(0), torch.zeros(0))
    return [w, torch.rand(n, generator=gen) * 0.02 + 1e-3, torch.zeros(n), torch.randn(n, generator=gen),
            torch.tensor([0.03]), torch.tensor([128.0]), 0, 255, 0.0, 8, prologue, norm[0], norm[1], 1e-6]


def block_ops(tokens: int, width: int, heads: int, mlp: int, gen: torch.Generator) -> list[tuple]:
    """(name, op, input shape, args) of each vitq:: call of one block."""
    lin, att = torch.ops.vitq.linear, torch.ops.vitq.attention
    uniform = [0.05, 128, 0, 255]
    return [
        ("norm1 + qkv", lin, [1, tokens, width], linear_args(width, 3 * width, PROLOGUE_LAYER_NORM, gen)),
        ("attention", att, [1, tokens, 3 * width],
         [heads, (width // heads) ** -0.5, *uniform, *uniform, *uniform, 1 / 255, 0, 0, 255, 0, 0]),
        ("proj", lin, [1, tokens, width], linear_args(width, width, PROLOGUE_NONE, gen)),
        ("norm2 + fc1", lin, [1, tokens, width], linear_args(width, mlp, PROLOGUE_LAYER_NORM, gen)),
        ("gelu + fc2", lin, [1, tokens, mlp], linear_args(mlp, width, PROLOGUE_GELU, gen)),
    ]


def count(device: str, op, shape: list[int], args: list, work: Path, gen: torch.Generator) -> int:
    x = torch.randn(*shape, generator=gen) * 2
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
    ap.add_argument("--devices", default="emulated-rpi4,emulated-rpi5")
    args = ap.parse_args()
    devices = args.devices.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, op, shape, op_args in block_ops(args.tokens, args.width, args.heads, args.mlp,
                                                  torch.Generator().manual_seed(0)):
            rows.append((name, [count(d, op, shape, op_args, Path(tmp), torch.Generator().manual_seed(1))
                                for d in devices]))
            print(f"{name}: " + ", ".join(f"{d} {c / 1e6:.2f} M" for d, c in zip(devices, rows[-1][1], strict=True)),
                  file=sys.stderr)
    print(f"# vitq:: ops of one block: {args.tokens} tokens, width {args.width}, {args.heads} heads, "
          f"MLP {args.mlp}; M guest instructions per call (x {args.blocks} blocks)\n")
    print("| op | " + " | ".join(f"{d} | x {args.blocks}" for d in devices) + " |")
    print("|---|" + "---:|---:|" * len(devices))
    for name, counts in rows + [("block", [sum(r[1][i] for r in rows) for i in range(len(devices))])]:
        print(f"| {name} | " + " | ".join(f"{c / 1e6:.2f} | {c * args.blocks / 1e6:.1f}" for c in counts) + " |")


if __name__ == "__main__":
    run_script(main)
