"""Does a built program compute the same logits on a device as on this machine, bit for bit?

    .venv/bin/python tools/device_parity.py build/compare-real/programs/adfq-W4A4 \
        --device emulated-rpi4 --limit 100 --out docs/validation/device-parity-real-adfq-W4A4

The first --limit images of the build's evaluation set (or --data) run through ExecuTorch's
Python runtime here (what `pte_host` in the tables measures) and through vitq-runner on
--device (emulated Pis: the aarch64 runner under qemu). Writes OUT.md and OUT.json with the
number of images whose logits are bit-identical, the largest difference and top-1 agreement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import vitq_edge  # noqa: F401  (torchvision shim before timm)
from vitq_edge import __version__
from vitq_edge.artifacts import file_sha256, resolve_build, write_atomic
from vitq_edge.data.datasets import DEFAULT_MAX_IMAGE_PIXELS
from vitq_edge.device.host_runtime import HostProgram
from vitq_edge.evaluate import device_logits, eval_inputs
from vitq_edge.lifetime import run_script


def host_logits(path: Path, data: str | None, limit: int) -> tuple[np.ndarray, np.ndarray]:
    pte, preprocess, images = eval_inputs(path, data, limit, max_pixels=DEFAULT_MAX_IMAGE_PIXELS)
    program = HostProgram(pte)
    logits, labels = [], []
    with torch.no_grad():
        for x, y in images.batches(preprocess, 25):
            logits.append(program(x).numpy())
            labels.append(y.numpy())
    return np.concatenate(logits), np.concatenate(labels)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("build", type=Path, help="build folder (or model.pte)")
    parser.add_argument("--device", default="emulated-rpi4")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--data", default=None, help="ImageFolder; default: the build's evaluation set")
    parser.add_argument("--threads", type=int, default=None,
                        help="the runner's threads on the device (default: 1 under emulation; our kernels give "
                             "the same logits at every thread count, and under qemu 2 threads take ~half the time)")
    parser.add_argument("--out", type=Path, required=True, help="output stem (writes OUT.md, OUT.json)")
    args = parser.parse_args()

    pte, manifest = resolve_build(args.build)
    start = time.monotonic()
    host, labels = host_logits(args.build, args.data, args.limit)
    remote, remote_labels, info = device_logits(args.build, args.device, data=args.data, limit=args.limit,
                                               threads=args.threads)
    seconds = time.monotonic() - start
    if not np.array_equal(labels, remote_labels) or host.shape != remote.shape:
        raise SystemExit("error: the two runs saw different images")
    identical = int(np.sum(np.all(host == remote, axis=1)))
    result = {
        "command": "python tools/device_parity.py " + shlex.join(sys.argv[1:]),
        "program": str(pte), "pte_sha256": file_sha256(pte), "recipe": manifest.get("recipe"),
        "bits": manifest.get("bits"),
        "build_command": manifest.get("command"), "recipe_config": manifest.get("recipe_config"),
        "device": info.get("device"), "detected_cpu": info.get("detected_cpu"), "threads": info.get("threads"),
        "data": info.get("data"),
        "images": len(labels), "bit_identical_images": identical,
        "max_abs_difference": float(np.abs(host - remote).max()),
        "top1_agreement": float(np.mean(host.argmax(1) == remote.argmax(1))),
        "top1_host": float(100 * np.mean(host.argmax(1) == labels)),
        "top1_device": float(100 * np.mean(remote.argmax(1) == labels)),
        "seconds": round(seconds, 1), "vitq_edge": __version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out.with_suffix(".json"), lambda f: f.write((json.dumps(result, indent=2) + "\n").encode()))
    md = [f"# Device parity: {result['program']} on {result['device']}", "",
          "Written by:", "", f"    {result['command']}", "",
          f"Program sha256 `{result['pte_sha256']}` (a table row records the hash of the program it measured).", "",
          *([f"The program was built by `{result['build_command']}`, settings "
             f"`{json.dumps(result['recipe_config'], sort_keys=True)}`.", ""] if result["build_command"] else []),
          f"Logits of ExecuTorch's Python runtime on this machine ({platform.system()} {platform.machine()}, "
          f"{os.cpu_count()} cores) against vitq-runner on "
          f"{result['device']} (detected CPU {json.dumps(result['detected_cpu'])}, {result['threads']} "
          f"thread{'s' if result['threads'] != 1 else ''}), on the first "
          f"{result['images']} images of {result['data']}.", "",
          "| images | bit-identical logits | max abs difference | top-1 agreement | top-1 here % | top-1 device % |",
          "|---|---|---|---|---|---|",
          f"| {result['images']} | {identical} | {result['max_abs_difference']:g} | "
          f"{100 * result['top1_agreement']:.1f}% | {result['top1_host']:.2f} | {result['top1_device']:.2f} |", "",
          f"Wall time {seconds / 60:.1f} min.", ""]
    write_atomic(args.out.with_suffix(".md"), lambda f: f.write("\n".join(md).encode()))
    print("\n".join(md))
    return 0 if identical == len(labels) else 1


if __name__ == "__main__":
    run_script(main)
