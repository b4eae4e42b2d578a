"""How fragile the real model's predictions are: the float model's agreement with itself when only its
weights are perturbed (rounded to 16-bit floats, or quantized to 8 or 7 bits), on the validation split.

    .venv/bin/python tools/agreement_floor.py

Each row changes every Linear and Conv2d weight of dinov2-s14-cifar10 (backbone and probe head), nothing
else (activations, LayerNorm, embeddings stay float32): rounded to bfloat16 (relative error <= 2^-9) or
float16 (<= 2^-12), or quantized per output channel to b-bit symmetric codes by min/max (minmax's weight
quantizer; its step is max|w| / (2^(b-1) - 1) per channel). Agreement is the
share of images whose top-1 equals the unperturbed model's: what the recipes' W8A8 target (>= 98.5%)
asks of a program whose weights alone already move this far. `--val-images` training images from
interleaved position 5,000 on (never the test split). Writes docs/validation/agreement-floor.{md,json}.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import vitq_edge  # noqa: F401  (torchvision shim before timm)
from vitq_edge.artifacts import write_measurement
from vitq_edge.data.cifar10 import VALIDATION_START, cifar10_validation
from vitq_edge.lifetime import run_script
from vitq_edge.metrics import accuracy_summary
from vitq_edge.models.dinov2 import MODEL_NAME
from vitq_edge.models.source import load_model
from vitq_edge.progress import progress
from vitq_edge.quant.quantizers import UniformQuantizer

REPO = Path(__file__).resolve().parents[1]


def _rounded_to(dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda w: w.to(dtype).float()


def _per_channel(bits: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def quantize(w: torch.Tensor) -> torch.Tensor:
        q = UniformQuantizer(bits, signed=True, granularity="channel")  # minmax's weight quantizer
        q.init_range(w)
        return q(w)
    return quantize


PERTURBATIONS = {
    "float16 weights": _rounded_to(torch.float16),
    "bfloat16 weights": _rounded_to(torch.bfloat16),
    "8-bit per-channel weights (min/max)": _per_channel(8),
    "7-bit per-channel weights (min/max)": _per_channel(7),
}


def perturbed(model: torch.nn.Module, change: Callable[[torch.Tensor], torch.Tensor]) -> torch.nn.Module:
    """A copy of `model` with every Linear and Conv2d weight replaced by change(weight)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for m in out.modules():
            if isinstance(m, torch.nn.Linear | torch.nn.Conv2d):
                m.weight.copy_(change(m.weight))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--val-images", type=int, default=1000)
    ap.add_argument("--out", default=str(REPO / "docs" / "validation" / "agreement-floor"))
    args = ap.parse_args()
    command = "python tools/agreement_floor.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    loaded = load_model(MODEL_NAME)
    images = cifar10_validation(args.val_images)
    labels = torch.from_numpy(images.labels)
    batches = [x for x, _ in images.batches(loaded.preprocess, 16)]

    def logits(model: torch.nn.Module, what: str) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([model(x) for x in progress(batches, what, unit="batch")])

    fp32 = logits(loaded.model, "float model")
    rows = []
    for name, change in PERTURBATIONS.items():
        acc = accuracy_summary(fp32, (out := logits(perturbed(loaded.model, change), name)), out, labels)
        rows.append({"weights": name, "top1": acc["simulated"], "agreement": acc["agreement"],
                     "sqnr_db": acc["sqnr_db"]})
        print(rows[-1], file=sys.stderr)
    fp32_top1 = accuracy_summary(fp32, fp32, fp32, labels)["fp32"]
    result = {"command": command, "model": MODEL_NAME, "val_images": args.val_images, "fp32_top1": fp32_top1,
              "rows": rows}
    out = Path(args.out)
    lines = ["# How far weight perturbations alone move the real model's predictions (validation split)", "",
             f"    {command}", "",
             f"{MODEL_NAME}, {args.val_images} validation images (training positions {VALIDATION_START}+), float "
             f"top-1 {fp32_top1:.2f}%. Each row changes every Linear and Conv2d weight and nothing else; "
             "agreement = share of images whose top-1 equals the float model's.", "",
             "| weights | top-1 % | agreement % | SQNR dB |", "|---|---:|---:|---:|"]
    lines += [f"| {r['weights']} | {r['top1']:.2f} | {r['agreement']:.2f} | {r['sqnr_db']} |" for r in rows]
    write_measurement(out, result, lines)


if __name__ == "__main__":
    run_script(main)
