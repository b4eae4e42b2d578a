"""`vitq-edge eval`: a built .pte's accuracy, preprocessing exactly as its manifest says."""

from __future__ import annotations

from pathlib import Path

import torch

from vitq_edge.artifacts import resolve_build
from vitq_edge.data.datasets import bundled_set, image_folder
from vitq_edge.data.preprocess import Preprocess
from vitq_edge.device.host_runtime import HostProgram
from vitq_edge.errors import VitqError
from vitq_edge.metrics import TopK
from vitq_edge.progress import progress


def evaluate_program(path: str | Path, data: str | Path | None = None, limit: int | None = None,
                     batch_size: int = 64) -> dict:
    """Top-1/top-5 (percent) and image count of the program at `path` on this machine."""
    pte, manifest = resolve_build(path)
    preprocess = Preprocess.from_manifest(manifest["input"])
    images = (image_folder(data) if data else bundled_set("eval")).limit(limit)
    num_classes = manifest["model"].get("num_classes")
    if num_classes is not None and num_classes != len(images.class_names):
        raise VitqError(f"the program has {num_classes} classes but data '{images.name}' has "
                        f"{len(images.class_names)}; pass --data DIR with matching class folders")
    program = HostProgram(pte)
    score = TopK()
    total = -(-len(images) // batch_size)
    with torch.no_grad():
        for x, y in progress(images.batches(preprocess, batch_size), "evaluating", total=total, unit="batch"):
            score.update(program(x), y)
    return {"top1": round(score.percent(1), 2), "top5": round(score.percent(5), 2), "n": score.n,
            "data": images.name, "program": str(pte)}
