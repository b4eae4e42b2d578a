"""`vitq-edge eval`: a built .pte's accuracy, preprocessing exactly as its manifest says."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from vitq_edge.artifacts import check_arithmetic, resolve_build
from vitq_edge.data.datasets import DEFAULT_MAX_IMAGE_PIXELS, ImageSet, image_folder
from vitq_edge.data.preprocess import Preprocess
from vitq_edge.device.host_runtime import HostProgram
from vitq_edge.errors import VitqError
from vitq_edge.lifetime import owned_temp_dir
from vitq_edge.metrics import TopK
from vitq_edge.models.source import default_data
from vitq_edge.progress import progress


def eval_inputs(path: str | Path, data: str | Path | None, limit: int | None,
                max_pixels: int) -> tuple[Path, Preprocess, ImageSet]:
    """The program, its manifest's preprocessing, and the labelled images to score it on."""
    pte, manifest = resolve_build(path)
    check_arithmetic(manifest, path)
    preprocess = Preprocess.from_manifest(manifest["input"])
    labels = manifest.get("labels")
    if data:
        images = image_folder(data, labels=labels, max_pixels=max_pixels).limit(limit)
    else:
        images, default_limit = default_data(manifest["model"].get("name", ""), "eval")
        images = images.limit(limit or default_limit)
    num_classes = manifest["model"].get("num_classes")
    if num_classes is not None and num_classes != len(images.class_names):
        raise VitqError(f"the program has {num_classes} classes but data '{images.name}' has "
                        f"{len(images.class_names)} class folders; pass --data DIR with one folder per class"
                        + (f" ({', '.join(labels[:3])}, ...)" if labels else ""))
    return pte, preprocess, images


def _described(images: ImageSet, result: dict) -> dict:
    if images.class_mapping:
        result["class_mapping"] = images.class_mapping
    return result


def evaluate_program(path: str | Path, data: str | Path | None = None, limit: int | None = None,
                     batch_size: int = 64, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> dict:
    """Top-1/top-5 (percent) and image count of the program at `path` on this machine."""
    pte, preprocess, images = eval_inputs(path, data, limit, max_pixels)
    program = HostProgram(pte)
    score = TopK()
    total = -(-len(images) // batch_size)
    with torch.no_grad():
        for x, y in progress(images.batches(preprocess, batch_size), "evaluating", total=total, unit="batch"):
            score.update(program(x), y)
    return _described(images, {"top1": round(score.percent(1), 2), "top5": round(score.percent(5), 2),
                                "n": score.n, "data": images.name, "program": str(pte)})


def device_logits(path: str | Path, device: str, data: str | Path | None = None, limit: int | None = None,
                  timeout: float | None = None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                  threads: int | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """The program's logits for every image, computed by vitq-runner on `device` with `threads`
    threads (None: one under emulation, else the runtime's default, one per core).

    Images are preprocessed here, exactly as the manifest says, written as float32
    batches [N, C, H, W] in .npy files, run image by image on the device, and the
    logits read back. Returns (logits [N, K], labels [N], what ran where).
    """
    from vitq_edge.device import RunRequest, get_device

    pte, preprocess, images = eval_inputs(path, data, limit, max_pixels)
    dev = get_device(device)
    pool = threads if threads is not None else (1 if dev.emulated else 0)
    # Batches bound memory on both sides and give the progress bar steps; under
    # emulation an image costs ~200x its native time, so those steps are smaller.
    per_image = 4 * preprocess.channels * preprocess.size[0] * preprocess.size[1]
    chunk = max(1, min(64 if dev.emulated else 512, (64 << 20) // per_image))
    deadline = None if timeout is None else time.monotonic() + timeout
    logits, labels, report = [], [], {}
    with owned_temp_dir("vitq-eval-") as tmp, dev.session(pte) as session:
        batch_file = Path(tmp) / "batch.npy"
        total = -(-len(images) // chunk)
        for x, y in progress(images.batches(preprocess, chunk), f"evaluating on {dev.name}", total=total,
                             unit="batch"):
            np.save(batch_file, x.numpy())
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise VitqError(f"the evaluation on {dev.name} took longer than --timeout {timeout:g} s and was "
                                "stopped; raise --timeout or use a smaller --limit")
            # By default one thread under qemu: the 2-4 host cores are better spent elsewhere, and
            # results do not depend on it; elsewhere the runtime's default (one per core).
            result = session.run(RunRequest(inputs=[batch_file], warmup=0, runs=1, threads=pool, outputs=True,
                                            timeout=left))
            out = result.output
            if out is None or out.ndim != 2 or out.shape[0] != len(y):
                raise VitqError(f"the program returned output of shape {None if out is None else out.shape} for "
                                f"{len(y)} images; expected [N, classes] logits (rebuild with `vitq-edge build`)")
            logits.append(out.astype(np.float32, copy=False))
            labels.append(y.numpy())
            report = result.report
    info = _described(images, {"device": dev.name, "runtime": "vitq-runner", "data": images.name,
                               "program": str(pte), "detected_cpu": report.get("cpu"),
                               "threads": report.get("threads", pool)})
    return np.concatenate(logits), np.concatenate(labels), info


def evaluate_on_device(path: str | Path, device: str, data: str | Path | None = None, limit: int | None = None,
                       timeout: float | None = None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> dict:
    """Top-1/top-5 (percent) of the program at `path`, run by vitq-runner on `device`."""
    t0 = time.monotonic()
    logits, labels, info = device_logits(path, device, data=data, limit=limit, timeout=timeout,
                                         max_pixels=max_pixels)
    score = TopK()
    score.update(torch.from_numpy(logits), torch.from_numpy(labels))
    return {"top1": round(score.percent(1), 2), "top5": round(score.percent(5), 2), "n": score.n, **info,
            "seconds": round(time.monotonic() - t0, 1)}
