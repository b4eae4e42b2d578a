"""Labelled image sets: ImageFolder directories and the bundled Fashion-MNIST subsets.

Both are read lazily and preprocessed in batches with the same `Preprocess`, so a
user's JPEGs and the bundled arrays go through one code path.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vitq_edge.data.options import DEFAULT_MAX_IMAGE_PIXELS, check_data_folder
from vitq_edge.data.preprocess import Preprocess
from vitq_edge.errors import VitqError
from vitq_edge.held_stderr import held_stderr

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}


def read_image(path: Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """The image at `path`, decoded; VitqError for anything that is not a readable image within the limit."""
    def refuse(why: str, fix: str = "remove it or replace it with a JPEG/PNG file") -> VitqError:
        return VitqError(f"cannot read image {path}: {why}; {fix}")

    # Our limit replaces PIL's, whose warning prints two lines of its own and whose error
    # fires at a fixed 179 M pixels.
    pil_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        # PIL warns about odd metadata ("Corrupt EXIF data") and libtiff prints decoding
        # problems itself: the image reads, or our one error line says why not.
        with held_stderr(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise refuse(f"{w}x{h} = {w * h:,} pixels is more than --max-image-pixels {max_pixels:,}",
                                 "raise --max-image-pixels if the image is genuine, or remove it")
                im.load()
                return im.copy()
    except VitqError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
        # PIL reports damaged files with all of these (ValueError: e.g. a text chunk that
        # inflates past PIL's limit; SyntaxError: some malformed headers).
        detail = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise refuse(f"{exc.__class__.__name__}: {detail}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = pil_limit


@dataclass
class ImageSet:
    """N labelled images; `source(i)` gives image i as a PIL image."""

    name: str
    class_names: list[str]
    labels: np.ndarray
    _paths: list[Path] | None = None
    _arrays: np.ndarray | None = None  # uint8 [N, H, W] or [N, H, W, C]
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    # How folder names became label indices (ImageFolder sets only): see `image_folder`.
    class_mapping: str | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def source(self, i: int) -> Image.Image:
        if self._arrays is not None:
            return Image.fromarray(self._arrays[i])
        return read_image(self._paths[i], self.max_pixels)

    def limit(self, n: int | None) -> ImageSet:
        if n is None or n >= len(self):
            return self
        if n <= 0:
            raise VitqError(f"--limit must be positive, got {n}")
        return self.subset(range(n))

    def subset(self, indices: range | list[int]) -> ImageSet:
        index = list(indices)
        return replace(self, labels=self.labels[index],
                       _paths=None if self._paths is None else [self._paths[i] for i in index],
                       _arrays=None if self._arrays is None else self._arrays[index])

    def interleaved(self) -> ImageSet:
        """The same images, classes taken in turn (each class in its own order): any first N are balanced."""
        by_class = [np.flatnonzero(self.labels == c) for c in np.unique(self.labels)]
        rank = np.empty(len(self), dtype=np.int64)
        for members in by_class:
            rank[members] = np.arange(len(members))
        return self.subset(np.lexsort((self.labels, rank)).tolist())  # by rank within its class, then class

    def batches(self, preprocess: Preprocess, batch_size: int = 64) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (inputs float32 [B, C, H, W], labels int64 [B])."""
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            x = np.stack([preprocess(self.source(i)) for i in range(start, stop)])
            yield torch.from_numpy(x), torch.from_numpy(self.labels[start:stop])


def _images_under(folder: Path) -> list[Path]:
    """Image files below a class folder, sorted; hidden files and folders (.DS_Store, AppleDouble
    `._x.png`, .git) skipped, symbolic links to folders not followed (no loops, no double counting)."""
    found = []

    def fail(err: OSError) -> None:
        raise VitqError(f"class folder {folder} is not readable ({err.strerror}); check its permissions")

    for top, dirs, files in os.walk(folder, onerror=fail):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(top) / f for f in files
                  if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found)


# How class folders became label indices (ImageSet.class_mapping, reported by eval).
BY_FOLDER_ORDER = "sorted folder names"
BY_LABEL_NAMES = "folder names = the model's labels"


def _class_indices(folders: list[str], labels: list[str] | None) -> tuple[list[int], str]:
    """Label index of each class folder, and how it was chosen.

    Folders named exactly as the model's labels ("/" in a label written "_", since no
    folder name can hold it) take those labels' indices, in any order and for any subset
    of the labels; otherwise the sorted folder order is the label order (ImageFolder's
    rule). A partial match is refused: it is almost surely a mistake either way.
    """
    if labels is None:
        return list(range(len(folders))), BY_FOLDER_ORDER
    index = {label.replace("/", "_"): i for i, label in enumerate(labels)}
    named = [f for f in folders if f in index]
    if not named:
        return list(range(len(folders))), BY_FOLDER_ORDER
    if len(named) == len(folders):  # every folder is a label (some labels may have no folder)
        return [index[f] for f in folders], BY_LABEL_NAMES
    stray = next(f for f in folders if f not in index)
    raise VitqError(f"only some class folders are named after the model's labels ({len(named)} of {len(folders)} "
                    f"folders; '{stray}' is no label); name the folders after the labels "
                    f"({', '.join(list(index)[:4])}, ...) or none of them (then sorted folder order is label order)")


def image_folder(directory: str | Path, labels: list[str] | None = None,
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> ImageSet:
    """An ImageFolder layout: one subfolder per class, images inside.

    With `labels` (the model's class names), folders named after them map by name;
    otherwise sorted folder order is label order (see `_class_indices`).
    """
    root = Path(directory)
    classes = check_data_folder(root)
    indices, mapping = _class_indices(classes, labels)
    paths: list[Path] = []
    targets: list[int] = []
    for index, cls in zip(indices, classes, strict=True):
        files = _images_under(root / cls)
        paths += files
        targets += [index] * len(files)
    if not paths:
        raise VitqError(f"data folder {root} holds no images; expected <class>/<image>.jpg|png subfolders")
    names = labels if mapping == BY_LABEL_NAMES else classes
    return ImageSet(root.name, list(names), np.asarray(targets, dtype=np.int64), _paths=paths,
                    max_pixels=max_pixels, class_mapping=mapping)


def bundled_set(kind: str) -> ImageSet:
    """The reference model's bundled calibration ('calib') or evaluation ('eval') set."""
    from vitq_edge.models.reference import load_reference_meta, reference_assets

    path = getattr(reference_assets(), kind)
    with np.load(path) as z:
        images, labels = z["images"], z["labels"].astype(np.int64)
    name = "bundled-fmnist-" + ("calibration" if kind == "calib" else "test")
    return ImageSet(name, load_reference_meta()["labels"], labels, _arrays=images)
