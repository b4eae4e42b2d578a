"""What PPOQ's outlier threshold does to the real model, one op kind at a time: every qkv (or fc1) input
of dinov2-s14-cifar10 through adfq's PerPatchOutlierQuantizer at b bits and threshold t, the rest of
the model float, on the validation split. This chose adfq's `fc1_threshold` default.

    .venv/bin/python tools/ppoq_threshold.py

Values with |x| > t stay float (the sparse correction on the device), the rest get per-token ranges
from `--calib-images` training images (the quantizer's own MSE choice among quantiles; no
reconstruction); the fake-quant forward. Also the share of each op's calibration values above a few
magnitudes. `--val-images` training images from interleaved position 5,000 on (never the test split).
Writes docs/validation/ppoq-threshold.{md,json} (or --out).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch
import vitq_edge  # noqa: F401  (torchvision shim before timm)
from vitq_edge.artifacts import write_measurement
from vitq_edge.data.cifar10 import VALIDATION_START, cifar10_images, cifar10_validation
from vitq_edge.errors import VitqError
from vitq_edge.lifetime import run_script
from vitq_edge.metrics import accuracy_summary
from vitq_edge.models.dinov2 import MODEL_NAME
from vitq_edge.models.source import load_model
from vitq_edge.progress import progress
from vitq_edge.quant.calibration import batches
from vitq_edge.quant.quantizers import PerPatchOutlierQuantizer

REPO = Path(__file__).resolve().parents[1]
MAGNITUDES = (3.0, 5.0, 7.0, 10.0)


def _layers(model: torch.nn.Module, op: str) -> list[torch.nn.Module]:
    return [block.attn.qkv if op == "qkv" else block.mlp.fc1 for block in model.blocks]


def _forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(b) for b in batches(x, 32)])


def _inputs(model: torch.nn.Module, layers: list[torch.nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """What each layer receives from the float model, for every image."""
    seen: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [layer.register_forward_pre_hook(lambda m, args, i=i: seen[i].append(args[0]))
             for i, layer in enumerate(layers)]
    try:
        _forward(model, x)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(s) for s in seen]


def _with_inputs_quantized(model: torch.nn.Module, layers: list[torch.nn.Module],
                           quantizers: list[PerPatchOutlierQuantizer], x: torch.Tensor) -> torch.Tensor:
    hooks = [layer.register_forward_pre_hook(lambda m, args, q=q: (q(args[0]),))
             for layer, q in zip(layers, quantizers, strict=True)]
    try:
        return _forward(model, x)
    finally:
        for h in hooks:
            h.remove()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-images", type=int, default=64)
    ap.add_argument("--val-images", type=int, default=256)
    ap.add_argument("--ops", default="fc1,qkv", help="qkv and/or fc1, comma-separated")
    ap.add_argument("--bits", default="4,6", help="activation bits to try, comma-separated")
    ap.add_argument("--thresholds", default="10,7,5,4", help="PPOQ thresholds to try, comma-separated")
    ap.add_argument("--out", default=str(REPO / "docs" / "validation" / "ppoq-threshold"))
    args = ap.parse_args()
    command = "python tools/ppoq_threshold.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    ops = args.ops.split(",")
    if not set(ops) <= {"qkv", "fc1"}:
        raise VitqError(f"--ops {args.ops}: give qkv and/or fc1, comma-separated")
    try:
        widths = [int(b) for b in args.bits.split(",")]
        thresholds = [float(t) for t in args.thresholds.split(",")]
    except ValueError:
        raise VitqError("--bits takes integers and --thresholds numbers, comma-separated (e.g. 4,6 and 10,5)") from None

    loaded = load_model(MODEL_NAME)
    model = loaded.model.eval()
    calib_set = cifar10_images("train").subset(range(args.calib_images))
    val_set = cifar10_validation(args.val_images)
    calib = torch.cat([x for x, _ in calib_set.batches(loaded.preprocess, 32)])
    val = torch.cat([x for x, _ in val_set.batches(loaded.preprocess, 32)])
    labels = torch.from_numpy(val_set.labels)
    fp32 = _forward(model, val)

    shares, rows, inputs = {}, [], {}
    settings = [(op, bits, t) for op in ops for bits in widths for t in thresholds]
    for op, bits, threshold in progress(settings, "PPOQ settings", unit="setting"):
        layers = _layers(model, op)
        if op not in inputs:
            inputs = {op: _inputs(model, layers, calib)}  # one op kind's inputs in memory at a time
            shares[op] = [{f">{m:g}": round(100 * float((x.abs() > m).float().mean()), 3) for m in MAGNITUDES}
                          | {"max": round(float(x.abs().max()), 1)} for x in inputs[op]]
        quantizers = []
        for x in inputs[op]:
            q = PerPatchOutlierQuantizer(bits, threshold, init="mse")  # adfq's init for these ops
            q.init_range(x)
            quantizers.append(q)
        logits = _with_inputs_quantized(model, layers, quantizers, val)
        acc = accuracy_summary(fp32, logits, logits, labels)
        rows.append({"op": op, "bits": bits, "threshold": threshold,
                     "outliers_max_pct": round(100 * max(q.outlier_fraction for q in quantizers), 3),
                     "top1": acc["simulated"], "agreement": acc["agreement"], "sqnr_db": acc["sqnr_db"]})
        print(rows[-1], file=sys.stderr)
    fp32_top1 = accuracy_summary(fp32, fp32, fp32, labels)["fp32"]
    result = {"command": command, "calib_images": args.calib_images, "val_images": args.val_images,
              "fp32_top1": fp32_top1, "shares_pct": shares, "rows": rows}
    lines = ["# PPOQ's outlier threshold, one op kind at a time (real model, validation split)", "",
             f"    {command}", "",
             f"dinov2-s14-cifar10: every input of the op kind through adfq's PerPatchOutlierQuantizer (values above "
             f"the threshold stay float; per-token ranges from {args.calib_images} calibration images, MSE among "
             f"quantiles; no reconstruction), the rest of the model float; {args.val_images} validation images "
             f"(training positions {VALIDATION_START}+), fake-quant forward. Float top-1 {fp32_top1:.2f}%. "
             "Outliers: the largest share of calibration values kept float, over the 12 blocks.", "",
             "| op | bits | threshold | outliers % | top-1 % | agreement % | SQNR dB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['op']} | {r['bits']} | {r['threshold']:g} | {r['outliers_max_pct']:.3f} | {r['top1']:.2f} | "
              f"{r['agreement']:.2f} | {r['sqnr_db']} |" for r in rows]
    for op in ops:
        lines += ["", f"Share of {op} inputs (calibration images) above each magnitude, % per block:", "",
                  "| block | " + " | ".join(f">{m:g}" for m in MAGNITUDES) + " | max |",
                  "|---:|" + "---:|" * (len(MAGNITUDES) + 1)]
        lines += [f"| {i} | " + " | ".join(f"{s[f'>{m:g}']:.3f}" for m in MAGNITUDES) + f" | {s['max']} |"
                  for i, s in enumerate(shares[op])]
    write_measurement(Path(args.out), result, lines)


if __name__ == "__main__":
    run_script(main)
