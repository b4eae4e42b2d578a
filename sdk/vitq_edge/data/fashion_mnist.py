"""Read the four standard Fashion-MNIST IDX files (gzipped or not).

Debian's `dataset-fashion-mnist` installs them under /usr/share/datasets/fashion-mnist;
any directory that holds them works.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _open_idx(directory: Path, stem: str) -> bytes:
    for name, opener in ((stem + ".gz", gzip.open), (stem, open)):
        path = directory / name
        if path.exists():
            with opener(path, "rb") as f:
                return f.read()
    raise FileNotFoundError(
        f"{directory} has no {stem}[.gz]; install Debian's dataset-fashion-mnist "
        "or point at a directory holding the four IDX files"
    )


def _parse_idx(raw: bytes) -> np.ndarray:
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError("not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    return data.reshape(shape)


def load_split(split: str, directory: Path | str = DEBIAN_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 [N, 28, 28], labels int64 [N]) of `split` ('train' or 'test')."""
    images_stem, labels_stem = _FILES[split]
    directory = Path(directory)
    images = _parse_idx(_open_idx(directory, images_stem))
    labels = _parse_idx(_open_idx(directory, labels_stem)).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{directory}: {split} images and labels differ in count")
    return images, labels
