#!/usr/bin/env python3
"""Export the stock ExecuTorch baselines of a timm model (default: DeiT-Tiny 224).

Two XNNPACK programs, exactly as an ExecuTorch user would make them:

  <name>_fp32.pte   torch.export.export + to_edge_transform_and_lower(XnnpackPartitioner)
                    + to_executorch
  <name>_int8.pte   stock PT2E static int8: XNNPACKQuantizer with
                    get_symmetric_quantization_config(is_per_channel=True),
                    prepare_pt2e, calibration on random batches, convert_pt2e,
                    then exported and lowered the same way

Weights are random (timm's init under --seed) unless --pretrained: instruction counts
do not depend on the weights. These are the programs behind the reference counts in
shared/DESIGN.md ("aarch64 / Raspberry Pi 4"); count one with

    .venv/bin/python tools/export_deit_tiny.py --out build/deit
    qemu-aarch64 -cpu cortex-a72 -L build/runtime/pi-prefix/rpi4 \\
        -plugin build/runtime/qemu-plugin/libinsn_count.so,out=build/deit/a72_fp32.json \\
        build/runtime/aarch64/bin/vitq-runner build/deit/deit_tiny_patch16_224_fp32.pte \\
        --warmup 1 --runs 1 --threads 1

and read "spans"[-1] (the timed forward call) from the JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import timm
import torch
import vitq_edge  # noqa: F401  (must come before timm: makes torchvision importable)
from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
    XNNPACKQuantizer,
    get_symmetric_quantization_config,
)
from executorch.exir import to_edge_transform_and_lower
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e


def lower(exported: torch.export.ExportedProgram, path: Path) -> None:
    t0 = time.time()
    edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
    program = edge.to_executorch()
    path.write_bytes(program.buffer)
    partitions = sum(
        1
        for n in edge.exported_program().graph_module.graph.nodes
        if n.op == "call_function" and "executorch_call_delegate" in str(n.target)
    )
    print(
        f"{path}: {len(program.buffer) / 1e6:.1f} MB, {partitions} XNNPACK partitions "
        f"({time.time() - t0:.0f} s)",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="deit_tiny_patch16_224", help="timm model name")
    ap.add_argument("--out", type=Path, default=Path("build/deit"), help="output directory")
    ap.add_argument("--which", choices=["fp32", "int8", "both"], default="both")
    ap.add_argument("--seed", type=int, default=0, help="seed for weights and random inputs")
    ap.add_argument("--calib-batches", type=int, default=4, help="random calibration batches (int8)")
    ap.add_argument("--pretrained", action="store_true", help="download timm's pretrained weights")
    args = ap.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, pretrained=args.pretrained).eval()
    shape = (1, *model.pretrained_cfg["input_size"])
    example = (torch.randn(shape),)
    stem = args.out / args.model.replace("/", "_")

    with torch.no_grad():
        if args.which in ("fp32", "both"):
            lower(torch.export.export(model, example), Path(f"{stem}_fp32.pte"))
        if args.which in ("int8", "both"):
            quantizer = XNNPACKQuantizer().set_global(
                get_symmetric_quantization_config(is_per_channel=True)
            )
            prepared = prepare_pt2e(torch.export.export(model, example).module(), quantizer)
            for _ in range(args.calib_batches):
                prepared(torch.randn(shape))
            converted = convert_pt2e(prepared)
            lower(torch.export.export(converted, example), Path(f"{stem}_int8.pte"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
