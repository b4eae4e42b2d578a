"""`vitq-edge compare` of the real model on a validation split carved from the CIFAR-10 training data,
for choosing recipe options (never on the test split).

    .venv/bin/python tools/validation_compare.py --programs liu2021@W6A6,liu2021@mixed:6 --name mixed6
    .venv/bin/python tools/validation_compare.py --programs liu2021@mixed:6 --option mp_normalise=kind \
        --name mixed6-kind
    .venv/bin/python tools/validation_compare.py --programs adfq@W4A4 --iters 100 \
        --option round_gradient=none --name adfq-w4-100-noround

Calibration: the build's default (the first 1,024 training images, classes interleaved);
validation: `--val-images` training images from interleaved position 5,000 on. Writes
docs/validation/NAME.{md,json,png} as rows finish (program folders under build/validation/NAME);
the same command resumes.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import vitq_edge  # noqa: F401  (torchvision shim before timm)
from vitq_edge.build_options import BuildOptions
from vitq_edge.compare import CompareOptions, compare
from vitq_edge.data.cifar10 import cifar10_validation
from vitq_edge.lifetime import run_script
from vitq_edge.models.dinov2 import MODEL_NAME
from vitq_edge.recipes import parse_options

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--programs", required=True, help="RECIPE@BITS,... as for vitq-edge compare")
    ap.add_argument("--name", required=True, help="table name under docs/validation/")
    ap.add_argument("--iters", type=int, default=None, help="adfq reconstruction iterations per unit")
    ap.add_argument("--option", action="append", default=[], help="recipe config field KEY=VALUE (repeatable)")
    ap.add_argument("--val-images", type=int, default=1000)
    args = ap.parse_args()
    command = "python tools/validation_compare.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    shared = BuildOptions(model=MODEL_NAME, iters=args.iters, recipe_options=parse_options(args.option))
    compare(CompareOptions(build=shared, programs=args.programs.split(","), devices=[],
                           eval_set=cifar10_validation(args.val_images),
                           out=str(REPO / "build" / "validation" / args.name),
                           table=str(REPO / "docs" / "validation" / args.name), command=command))


if __name__ == "__main__":
    run_script(main)  # SIGTERM unwinds like Ctrl-C: a stopped run removes its temporary folders
