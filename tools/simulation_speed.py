"""Seconds per image of the simulated quantized model (what `build` and `compare` evaluate) on the real
model, by images per forward: the measurement behind `vit.SIMULATION_IMAGES`.

    .venv/bin/python tools/simulation_speed.py

Each recipe is calibrated on 8 training images with its search and reconstruction cut to the minimum
(the same quantizer types and integer arithmetic as its default build, so the same cost per image:
liu2021 with 2 candidate intervals, 1 round and no ranking loss; adfq with 0 iterations). Then
`--images` test images go through the kernel arithmetic at each width, on torch's default threads; every
width's logits must equal the first's bit for bit. Writes docs/validation/simulation-speed.{md,json}.
Run it alone: the timings are wall clock.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch
import vitq_edge  # noqa: F401  (torchvision shim before timm)
from vitq_edge.artifacts import write_measurement
from vitq_edge.data.cifar10 import cifar10_images
from vitq_edge.errors import VitqError
from vitq_edge.hostinfo import host_description
from vitq_edge.lifetime import run_script
from vitq_edge.models.dinov2 import MODEL_NAME
from vitq_edge.models.source import load_model
from vitq_edge.quant import quantize, recipe_config
from vitq_edge.quant.vit import simulate

REPO = Path(__file__).resolve().parents[1]
PROGRAMS = {
    "minmax@W8A8": ("minmax", "W8A8", {}),
    "liu2021@W6A6": ("liu2021", "W6A6", {"candidates": 2, "rounds": 1, "search_images": 8, "ranking": False}),
    "adfq@W4A4": ("adfq", "W4A4", {"iters": 0}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=32, help="test images timed at each width")
    ap.add_argument("--widths", default="32,8,4,2,1", help="images per forward, comma-separated")
    ap.add_argument("--out", default=str(REPO / "docs" / "validation" / "simulation-speed"))
    args = ap.parse_args()
    command = "python tools/simulation_speed.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    widths = [int(w) for w in args.widths.split(",")]
    loaded = load_model(MODEL_NAME)
    calib = torch.cat([x for x, _ in cifar10_images("train").subset(range(8)).batches(loaded.preprocess, 8)])
    test = torch.cat([x for x, _ in cifar10_images("test").subset(range(args.images))
                      .batches(loaded.preprocess, args.images)])
    rows = []
    for program, (recipe, bits, options) in PROGRAMS.items():
        model = quantize(loaded.model, recipe_config(recipe, bits, **options), [calib], (calib[:1],)).module
        first = None
        seconds = {}
        with torch.no_grad():
            model(test[:1])  # warm-up
            for width in widths:
                start = time.perf_counter()
                logits = simulate(model, test, width)
                seconds[width] = (time.perf_counter() - start) / len(test)
                first = logits if first is None else first
                if not torch.equal(logits, first):
                    raise VitqError(f"{program}: {width} images per forward changed the logits")
        rows.append({"program": program, "seconds_per_image": {str(w): round(s, 3) for w, s in seconds.items()}})
        print(rows[-1], file=sys.stderr)
    result = {"command": command, "model": MODEL_NAME, "images": args.images, "threads": torch.get_num_threads(),
              "host": host_description(), "rows": rows}
    lines = ["# The simulated model's evaluation speed by images per forward (real model)", "",
             f"    {command}", "",
             f"{MODEL_NAME} at 224 px, {args.images} test images, {torch.get_num_threads()} threads, "
             f"{host_description()}. Seconds per image (wall clock); every width gives the same logits.", "",
             "| program | " + " | ".join(f"{w} per forward" for w in widths) + " |",
             "|---|" + "---:|" * len(widths)]
    lines += [f"| {r['program']} | " + " | ".join(f"{r['seconds_per_image'][str(w)]:.3f}" for w in widths) + " |"
              for r in rows]
    write_measurement(Path(args.out), result, lines)


if __name__ == "__main__":
    run_script(main)
