"""The quality/time curve of `adfq` on the real model, for choosing its CPU default: W4A4 at several
reconstruction lengths, measured on a validation split carved from the training data.

    .venv/bin/python tools/adfq_curve.py --iters 0,100,300,1000
    .venv/bin/python tools/adfq_curve.py --iters 0,100,300 --option batch_size=8 --out docs/adfq-curve-b8

Each point is one `vitq-edge compare` run (model dinov2-s14-cifar10, calibration on the build's
default 1,024 training images) evaluated on `--val-images` other training images (interleaved
positions from 5,000 on: vitq_edge.data.cifar10.cifar10_validation), never the test split. Points are
written to OUT.{md,json} as they finish; a rerun skips the finished ones (their compare
folders under build/adfq-curve/).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import vitq_edge  # noqa: F401  (torchvision shim before timm)
from vitq_edge.artifacts import write_atomic
from vitq_edge.build_options import BuildOptions
from vitq_edge.compare import CompareOptions, compare
from vitq_edge.data.cifar10 import cifar10_validation
from vitq_edge.lifetime import run_script
from vitq_edge.models.dinov2 import MODEL_NAME
from vitq_edge.recipes import parse_options

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", default="0,100,300,1000")
    ap.add_argument("--bits", default="W4A4")
    ap.add_argument("--val-images", type=int, default=1000)
    ap.add_argument("--option", action="append", default=[], help="adfq config field KEY=VALUE (repeatable)")
    ap.add_argument("--out", default=str(REPO / "docs" / "adfq-curve"))
    ap.add_argument("--work", default=str(REPO / "build" / "adfq-curve"))
    args = ap.parse_args()
    command = "python tools/adfq_curve.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    val = cifar10_validation(args.val_images)
    options = parse_options(args.option)
    points = []
    for iters in [int(n) for n in args.iters.split(",")]:
        tag = "-".join([f"{args.bits}-iters{iters}", *(f"{k}{v}" for k, v in options.items())])
        shared = BuildOptions(model=MODEL_NAME, iters=iters, recipe_options=options)
        table = compare(CompareOptions(build=shared, programs=[f"adfq@{args.bits}"], devices=[], eval_set=val,
                                       out=str(Path(args.work) / tag), table=str(Path(args.work) / tag / "table"),
                                       command=command))
        row = table["rows"][0]
        points.append({"iters": iters, "bits": args.bits, "options": options, **row["accuracy"],
                       "calibration_seconds": row["calibration_seconds"], "recipe_config": row["recipe_config"],
                       "command": command})
        out = Path(args.out)
        text = json.dumps(points, indent=2) + "\n"
        write_atomic(out.with_suffix(".json"), lambda f, text=text: f.write(text.encode()))
        md = _markdown(points, command)
        write_atomic(out.with_suffix(".md"), lambda f, md=md: f.write(md.encode()))


def _markdown(points: list[dict], command: str) -> str:
    lines = ["# adfq: accuracy against calibration time (real model, validation split)", "",
             f"    {command}", "",
             f"dinov2-s14-cifar10, {points[0]['bits']}, evaluated on {points[0]['eval_images']} images of "
             f"{points[0]['eval_set']}; float top-1 {points[0]['fp32']:.2f}%. Calibration time on this machine.", "",
             "| iters per unit | top-1 % | .pte % | drop | agreement % | SQNR dB | calibration min |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for p in points:
        sq = "–" if p["sqnr_db"] is None else f"{p['sqnr_db']:.2f}"
        lines.append(f"| {p['iters']} | {p['simulated']:.2f} | {p['pte_host']:.2f} | {p['drop']:+.2f} | "
                     f"{p['agreement']:.2f} | {sq} | {p['calibration_seconds'] / 60:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_script(main)
