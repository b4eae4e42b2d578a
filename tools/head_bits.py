"""What quantizing the classifier head (or, with `--layer stem`, the patch embedding) costs on the
real model, alone: the float backbone's features of validation images through the head with its
weights and input at W bits (for the stem: the images through the quantized patch embedding and the
float rest of the model), using each paper recipe's own quantizers for that op (ranges from
calibration images; no search, no reconstruction). This chose the recipes' `head_bits` and
`stem_bits` defaults.

    .venv/bin/python tools/head_bits.py
    .venv/bin/python tools/head_bits.py --layer stem --widths 4,6,8

Calibration: the first `--calib-images` training images (classes interleaved), as a build takes
them; validation: `--val-images` training images from interleaved position 5,000 on (never the
test split). Writes docs/validation/{head,stem}-bits.{md,json} (or --out).
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
from vitq_edge.data.datasets import ImageSet
from vitq_edge.lifetime import run_script
from vitq_edge.metrics import accuracy_summary
from vitq_edge.models.dinov2 import MODEL_NAME
from vitq_edge.models.source import load_model
from vitq_edge.quant import vit
from vitq_edge.quant.adfq import adfq_factory
from vitq_edge.quant.liu2021 import liu_factory
from vitq_edge.quant.minmax import minmax_factory
from vitq_edge.recipes import HEAD_OP, STEM_OP, layer_bits, recipe_config

REPO = Path(__file__).resolve().parents[1]


def _head_inputs(model: torch.nn.Module, images: ImageSet, preprocess) -> torch.Tensor:
    """What the head receives from the float backbone, for every image."""
    seen: list[torch.Tensor] = []
    hook = model.head.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        for x, _ in images.batches(preprocess, 32):
            model(x)
    hook.remove()
    return torch.cat(seen)


def _images(images: ImageSet, preprocess) -> torch.Tensor:
    return torch.cat([x for x, _ in images.batches(preprocess, 32)])


def _quantized_op(layer: torch.nn.Module, op: str, recipe: str, bits: int, calib: torch.Tensor) -> torch.nn.Module:
    """The head (or the stem) as the recipe quantizes it at `bits` (an op's quantizers do not
    depend on the rest of the model's width)."""
    config = recipe_config(recipe, f"W{bits}A{bits}", stem_bits=bits, head_bits=bits)
    bits_for = layer_bits(config)
    make = {"minmax": lambda: minmax_factory(bits_for), "liu2021": lambda: liu_factory(bits_for),
            "adfq": lambda: adfq_factory(config)}[recipe]()
    wrap = vit.QuantLinear if op == HEAD_OP else vit.QuantConv2d
    q = wrap(layer, make(op, "weight"), make(op, "input"))
    q.weight_quant.init_range(layer.weight.detach())
    q.input_quant.init_range(calib)
    return q


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-images", type=int, default=256)
    ap.add_argument("--val-images", type=int, default=512)
    ap.add_argument("--layer", choices=("head", "stem"), default="head",
                    help="the classifier head, or the patch embedding (stem)")
    ap.add_argument("--widths", default="4,5,6,7,8", help="bits to try, comma-separated")
    ap.add_argument("--out", default=None, help="default docs/validation/head-bits (stem: stem-bits)")
    args = ap.parse_args()
    command = "python tools/head_bits.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    out = Path(args.out or REPO / "docs" / "validation" / f"{args.layer}-bits")
    widths = [int(w) for w in args.widths.split(",")]
    loaded = load_model(MODEL_NAME)
    model = loaded.model
    train = cifar10_images("train")
    calib_set, val_set = train.subset(range(args.calib_images)), cifar10_validation(args.val_images)
    labels = torch.from_numpy(val_set.labels)
    if args.layer == "head":
        op, layer = HEAD_OP, model.head
        calib, val = _head_inputs(model, calib_set, loaded.preprocess), _head_inputs(model, val_set, loaded.preprocess)
        what = ("the float backbone's features of {n} validation images (training positions {start}+) through "
                "the head, its weights and input at head_bits")
    else:
        op, layer = STEM_OP, model.patch_embed.proj
        calib, val = _images(calib_set, loaded.preprocess), _images(val_set, loaded.preprocess)
        what = ("{n} validation images (training positions {start}+) through the patch embedding, its weights "
                "and input at the listed bits, and the float rest of the model")

    def forward(x: torch.Tensor, quantized: torch.nn.Module | None) -> torch.Tensor:
        if args.layer == "head":
            return (quantized or layer)(x)
        model.patch_embed.proj = quantized or layer
        try:
            return torch.cat([model(x[i:i + 64]) for i in range(0, len(x), 64)])
        finally:
            model.patch_embed.proj = layer

    with torch.no_grad():
        fp32 = forward(val, None)
    rows = []
    for recipe in ("minmax", "liu2021", "adfq"):
        for bits in widths:
            q = _quantized_op(layer, op, recipe, bits, calib)
            with torch.no_grad(), vit.arithmetic("fake-quant"):
                logits = forward(val, q)
            acc = accuracy_summary(fp32, logits, logits, labels)
            rows.append({"recipe": recipe, "bits": bits, "top1": acc["simulated"],
                         "agreement": acc["agreement"], "sqnr_db": acc["sqnr_db"]})
            print(rows[-1], file=sys.stderr)
    fp32_top1 = accuracy_summary(fp32, fp32, fp32, labels)["fp32"]
    result = {"command": command, "layer": op, "calib_images": args.calib_images, "val_images": args.val_images,
              "fp32_top1": fp32_top1, "layer_weights": layer.weight.numel(),
              "model_weights": sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight")),
              "rows": rows}
    lines = [f"# {op} quantized alone (real model, validation split)", "", f"    {command}", "",
             f"dinov2-s14-cifar10: {what.format(n=args.val_images, start=VALIDATION_START)}, "
             "quantized by each recipe's "
             f"quantizers for that op (ranges from {args.calib_images} calibration images; the fake-quant forward). "
             f"Float top-1 {fp32_top1:.2f}%; {op} holds {layer.weight.numel()} weights.", "",
             "| recipe | bits | top-1 % | agreement % | SQNR dB |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['recipe']} | {r['bits']} | {r['top1']:.2f} | {r['agreement']:.2f} | {r['sqnr_db']} |"
              for r in rows]
    write_measurement(out, result, lines)


if __name__ == "__main__":
    run_script(main)
