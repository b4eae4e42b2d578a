"""One built program of the real model through two kernel runtimes, on the validation split: how an
arithmetic change of the kernels (and of its reference, quant/arith.py) moves accuracy, before the
accuracy tables are rebuilt on it.

    .venv/bin/python tools/runtime_ab.py build/cost-adfq-W8A8-iters0 --before /work/rt-old \
        --after build/runtime --name av-integer-levels-adfq-W8A8

Each runtime folder's host libvitq_kernels.so (as VITQ_RUNTIME_DIR selects it) runs the program in
ExecuTorch's Python runtime here, in a child process each (a process loads the library once), on
`--val-images` CIFAR-10 training images from the validation positions (vitq_edge.data.cifar10.cifar10_validation);
the float model runs on the same images. The program's quantizers stay as built, so only the
kernels' arithmetic differs. Writes docs/validation/NAME.{md,json}: top-1, agreement with the float
model and logit SQNR under each runtime, and how far the two differ.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import vitq_edge  # noqa: F401  (torchvision shim before timm)
from vitq_edge import __version__
from vitq_edge.artifacts import resolve_build, write_atomic
from vitq_edge.data.cifar10 import cifar10_validation
from vitq_edge.data.preprocess import Preprocess
from vitq_edge.device.host_runtime import HostProgram
from vitq_edge.lifetime import run_script
from vitq_edge.metrics import sqnr_db
from vitq_edge.models.dinov2 import MODEL_NAME
from vitq_edge.models.source import load_model

REPO = Path(__file__).resolve().parents[1]
BATCH = 25


def program_logits(build: Path, images: int, save: Path) -> None:
    """Child: the program's logits on the validation images, with this process's kernels library."""
    pte, manifest = resolve_build(build)
    preprocess = Preprocess.from_manifest(manifest["input"])
    program = HostProgram(pte)
    logits = []
    with torch.no_grad():
        for x, _ in cifar10_validation(images).batches(preprocess, BATCH):
            logits.append(program(x).numpy())
    np.save(save, np.concatenate(logits))


def _share(a: np.ndarray, b: np.ndarray) -> float:
    return round(100.0 * float(np.mean(a.argmax(1) == b.argmax(1))), 2)


def _top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return round(100.0 * float(np.mean(logits.argmax(1) == labels)), 2)


def _runtime_row(label: str, logits: np.ndarray, fp32: np.ndarray, labels: np.ndarray) -> dict:
    return {"runtime": label, "top1": _top1(logits, labels), "agreement": _share(logits, fp32),
            "sqnr_db": sqnr_db(torch.from_numpy(logits), torch.from_numpy(fp32))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("build", type=Path, help="build folder of the real model (or its model.pte)")
    ap.add_argument("--before", type=Path, required=True, help="runtime folder of the current arithmetic")
    ap.add_argument("--after", type=Path, required=True, help="runtime folder of the new arithmetic")
    ap.add_argument("--labels", default="before,after", help="what the two runtimes are, for the table: BEFORE,AFTER")
    ap.add_argument("--name", required=True, help="table name under docs/validation/")
    ap.add_argument("--val-images", type=int, default=1000)
    ap.add_argument("--logits-to", type=Path, help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()
    if args.logits_to is not None:
        program_logits(args.build, args.val_images, args.logits_to)
        return

    command = "python tools/runtime_ab.py " + shlex.join(sys.argv[1:])
    pte, manifest = resolve_build(args.build)
    if manifest["model"].get("name") != MODEL_NAME:
        raise SystemExit(f"error: {pte} is not a build of {MODEL_NAME}; this tool compares on its validation split")
    names = args.labels.split(",", 1) if "," in args.labels else ["before", "after"]
    start = time.monotonic()
    logits = {}
    with tempfile.TemporaryDirectory(prefix="runtime-ab-") as tmp:
        for name, folder in (("before", args.before), ("after", args.after)):
            save = Path(tmp) / f"{name}.npy"
            print(f"runtime_ab: {name}: {folder}", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, __file__, str(args.build), "--before", str(args.before), "--after",
                            str(args.after), "--name", args.name, "--val-images", str(args.val_images),
                            "--logits-to", str(save)], check=True,
                           env={**os.environ, "VITQ_RUNTIME_DIR": str(folder.resolve())})
            logits[name] = np.load(save)
    print("runtime_ab: the float model", file=sys.stderr, flush=True)
    loaded = load_model(MODEL_NAME)
    images = cifar10_validation(args.val_images)
    fp32, labels = [], []
    with torch.no_grad():
        for x, y in images.batches(loaded.preprocess, BATCH):
            fp32.append(loaded.model(x).numpy())
            labels.append(y.numpy())
    fp32, labels = np.concatenate(fp32), np.concatenate(labels)
    before, after = logits["before"], logits["after"]
    result = {
        "command": command, "program": str(pte), "recipe": manifest.get("recipe"), "bits": manifest.get("bits"),
        "build_command": manifest.get("command"), "images": images.name, "count": int(labels.shape[0]),
        "fp32_top1": _top1(fp32, labels),
        "runtimes": [_runtime_row(names[0], before, fp32, labels), _runtime_row(names[1], after, fp32, labels)],
        "after_vs_before": {"top1_agreement": _share(after, before),
                            "bit_identical_images": int(np.sum(np.all(after == before, axis=1))),
                            "max_abs_difference": float(np.abs(after - before).max()),
                            "sqnr_db": sqnr_db(torch.from_numpy(after), torch.from_numpy(before))},
        "seconds": round(time.monotonic() - start, 1), "vitq_edge": __version__,
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores",
    }
    stem = REPO / "docs" / "validation" / args.name
    write_atomic(stem.with_suffix(".json"), lambda f: f.write((json.dumps(result, indent=2) + "\n").encode()))
    ab = result["after_vs_before"]
    md = [f"# Kernel arithmetic A/B: {result['program']}", "", "Written by:", "", f"    {command}", "",
          f"on {result['machine']}, vitq-edge {__version__}, in {result['seconds']:.0f} s. The program "
          f"({result['recipe']} {result['bits']}) was built by `{result['build_command']}`; both runtimes run "
          f"its quantizers as built, on {result['count']} images of {result['images']} (float model top-1 "
          f"{result['fp32_top1']:.2f}%).", "",
          "| kernels | top-1 % | agreement with float % | SQNR vs float dB |", "|---|---|---|---|"]
    md += [f"| {r['runtime']} | {r['top1']:.2f} | {r['agreement']:.2f} | {r['sqnr_db']} |" for r in result["runtimes"]]
    md += ["", f"After against before: top-1 agreement {ab['top1_agreement']:.2f}%, "
               f"{ab['bit_identical_images']} of {result['count']} images bit-identical, largest logit difference "
               f"{ab['max_abs_difference']:.4g}, SQNR {ab['sqnr_db']} dB.", ""]
    write_atomic(stem.with_suffix(".md"), lambda f: f.write("\n".join(md).encode()))
    print(f"runtime_ab: wrote {stem}.md", file=sys.stderr)


if __name__ == "__main__":
    run_script(main)
