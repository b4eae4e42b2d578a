"""Labelled image sets: ImageFolder directories and the bundled Fashion-MNIST subsets.

Both are read lazily and preprocessed in batches with the same `Preprocess`, so a
user's JPEGs and the bundled arrays go through one code path.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vitq_edge.data.preprocess import Preprocess
from vitq_edge.errors import VitqError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}


@dataclass
class ImageSet:
    """N labelled images; `source(i)` gives image i as a PIL image."""

    name: str
    class_names: list[str]
    labels: np.ndarray
    _paths: list[Path] | None = None
    _arrays: np.ndarray | None = None  # uint8 [N, H, W] or [N, H, W, C]

    def __len__(self) -> int:
        return len(self.labels)

    def source(self, i: int) -> Image.Image:
        if self._arrays is not None:
            return Image.fromarray(self._arrays[i])
        path = self._paths[i]
        try:
            with Image.open(path) as im:
                im.load()
                return im.copy()
        except (UnidentifiedImageError, OSError) as exc:
            raise VitqError(f"cannot read image {path}: {exc.__class__.__name__}; "
                            "remove it or replace it with a JPEG/PNG file") from None

    def limit(self, n: int | None) -> ImageSet:
        if n is None or n >= len(self):
            return self
        if n <= 0:
            raise VitqError(f"--limit must be positive, got {n}")
        return ImageSet(self.name, self.class_names, self.labels[:n],
                        None if self._paths is None else self._paths[:n],
                        None if self._arrays is None else self._arrays[:n])

    def batches(self, preprocess: Preprocess, batch_size: int = 64) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (inputs float32 [B, C, H, W], labels int64 [B])."""
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            x = np.stack([preprocess(self.source(i)) for i in range(start, stop)])
            yield torch.from_numpy(x), torch.from_numpy(self.labels[start:stop])


def image_folder(directory: str | Path) -> ImageSet:
    """An ImageFolder layout: one subfolder per class (sorted names), images inside."""
    root = Path(directory)
    if not root.is_dir():
        raise VitqError(f"data folder {root} does not exist; pass a directory with one subfolder per class")
    try:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except PermissionError:
        raise VitqError(f"data folder {root} is not readable; check its permissions") from None
    paths: list[Path] = []
    labels: list[int] = []
    for index, cls in enumerate(classes):
        try:
            files = sorted(p for p in (root / cls).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        except PermissionError:
            raise VitqError(f"class folder {root / cls} is not readable; check its permissions") from None
        paths += files
        labels += [index] * len(files)
    if not paths:
        raise VitqError(f"data folder {root} holds no images; expected <class>/<image>.jpg|png subfolders")
    return ImageSet(root.name, classes, np.asarray(labels, dtype=np.int64), _paths=paths)


def bundled_set(kind: str) -> ImageSet:
    """The reference model's bundled calibration ('calib') or evaluation ('eval') set."""
    from vitq_edge.models.reference import load_reference_meta, reference_assets

    path = getattr(reference_assets(), kind)
    with np.load(path) as z:
        images, labels = z["images"], z["labels"].astype(np.int64)
    name = "bundled-fmnist-" + ("calibration" if kind == "calib" else "test")
    return ImageSet(name, load_reference_meta()["labels"], labels, _arrays=images)
