"""What quantizing the classifier head costs on the real model, alone: the float backbone's
features of validation images through the head with its weights and input at W bits, using each
paper recipe's own head quantizers (ranges from calibration images; no search, no reconstruction).
This chose the recipes' `head_bits` default.

    .venv/bin/python tools/head_bits.py

Calibration: the first `--calib-images` training images (classes interleaved), as a build takes
them; validation: `--val-images` training images from interleaved position 5,000 on (never the
test split). Writes docs/validation/head-bits.{md,json} (or --out).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch
import vitq_edge  # noqa: F401  (torchvision shim before timm)
from validation_compare import VAL_START, validation_set  # tools/: the same validation split
from vitq_edge.artifacts import write_atomic
from vitq_edge.data.cifar10 import cifar10_split
from vitq_edge.data.datasets import ImageSet, image_folder
from vitq_edge.metrics import accuracy_summary
from vitq_edge.models.dinov2 import MODEL_NAME
from vitq_edge.models.source import load_model
from vitq_edge.quant import vit
from vitq_edge.quant.adfq import adfq_factory
from vitq_edge.quant.liu2021 import liu_factory
from vitq_edge.quant.minmax import minmax_factory
from vitq_edge.quant.recipes import HEAD_OP, layer_bits, recipe_config

REPO = Path(__file__).resolve().parents[1]
WIDTHS = (4, 5, 6, 7, 8)


def _head_inputs(model: torch.nn.Module, images: ImageSet, preprocess) -> torch.Tensor:
    """What the head receives from the float backbone, for every image."""
    seen: list[torch.Tensor] = []
    hook = model.head.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        for x, _ in images.batches(preprocess, 32):
            model(x)
    hook.remove()
    return torch.cat(seen)


def _quantized_head(head: torch.nn.Linear, recipe: str, bits: int, calib: torch.Tensor) -> vit.QuantLinear:
    """The head as the recipe quantizes it with head_bits=bits (the head's quantizers do not depend
    on the rest of the model's width)."""
    config = recipe_config(recipe, "W4A4", head_bits=bits)
    bits_for = layer_bits(config)
    make = {"minmax": lambda: minmax_factory(bits_for), "liu2021": lambda: liu_factory(bits_for),
            "adfq": lambda: adfq_factory(config)}[recipe]()
    q = vit.QuantLinear(head, make(HEAD_OP, "weight"), make(HEAD_OP, "input"))
    q.weight_quant.init_range(head.weight.detach())
    q.input_quant.init_range(calib)
    return q


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-images", type=int, default=256)
    ap.add_argument("--val-images", type=int, default=512)
    ap.add_argument("--out", default=None, help="default docs/validation/head-bits")
    args = ap.parse_args()
    command = "python tools/head_bits.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    out = Path(args.out or REPO / "docs" / "validation" / "head-bits")
    loaded = load_model(MODEL_NAME)
    train = image_folder(cifar10_split("train")).interleaved()
    calib = _head_inputs(loaded.model, train.subset(range(args.calib_images)), loaded.preprocess)
    val_set = validation_set(args.val_images)
    val = _head_inputs(loaded.model, val_set, loaded.preprocess)
    labels = torch.from_numpy(val_set.labels)
    head = loaded.model.head
    with torch.no_grad():
        fp32 = head(val)
    rows = []
    for recipe in ("minmax", "liu2021", "adfq"):
        for bits in WIDTHS:
            q = _quantized_head(head, recipe, bits, calib)
            with torch.no_grad(), vit.fake_quant_forward():
                logits = q(val)
            acc = accuracy_summary(fp32, logits, logits, labels)
            rows.append({"recipe": recipe, "head_bits": bits, "top1": acc["simulated"],
                         "agreement": acc["agreement"], "sqnr_db": acc["sqnr_db"]})
            print(rows[-1], file=sys.stderr)
    fp32_top1 = accuracy_summary(fp32, fp32, fp32, labels)["fp32"]
    result = {"command": command, "calib_images": args.calib_images, "val_images": args.val_images,
              "fp32_top1": fp32_top1, "head_weights": head.weight.numel(),
              "model_weights": sum(p.numel() for n, p in loaded.model.named_parameters() if n.endswith("weight")),
              "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2) + "\n"
    write_atomic(out.with_suffix(".json"), lambda f: f.write(text.encode()))
    lines = ["# The classifier head quantized alone (real model, validation split)", "", f"    {command}", "",
             f"dinov2-s14-cifar10: the float backbone's features of {args.val_images} validation images (training "
             f"positions {VAL_START}+) through the head, its weights and input at head_bits, quantized by each "
             f"recipe's head quantizers (ranges from {args.calib_images} calibration images; the fake-quant forward). "
             f"Float top-1 {fp32_top1:.2f}%; the head holds {head.weight.numel()} weights.", "",
             "| recipe | head_bits | top-1 % | agreement % | SQNR dB |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['recipe']} | {r['head_bits']} | {r['top1']:.2f} | {r['agreement']:.2f} | {r['sqnr_db']} |"
              for r in rows]
    md = "\n".join(lines) + "\n"
    write_atomic(out.with_suffix(".md"), lambda f: f.write(md.encode()))


if __name__ == "__main__":
    main()
