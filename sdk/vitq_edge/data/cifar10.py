"""CIFAR-10 as ImageFolders (real photographs), found or unpacked into the cache.

The project ships no images of its own for the real model: the data set comes as two
tarballs of JPEGs (`train.tar.gz`, `test.tar.gz`, with `SHA256SUMS`), found in
$VITQ_CIFAR10 or in the workspace's shared/data/cifar10/ beside the repository, and unpacked
once into the cache (`<cache>/cifar10/<split>/<class>/NNNN.jpg`).
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from dataclasses import replace
from pathlib import Path

from vitq_edge.artifacts import file_sha256
from vitq_edge.cache import cache_dir
from vitq_edge.data.datasets import ImageSet, image_folder
from vitq_edge.errors import VitqError

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SPLIT_SIZES = {"train": 50_000, "test": 10_000}
# The validation split: interleaved training positions from here on. Builds calibrate on the
# first positions (1,024 by default, default_data), so no build has seen these images.
VALIDATION_START = 5000
_REPO = Path(__file__).resolve().parents[3]


def _sources() -> list[Path]:
    env = os.environ.get("VITQ_CIFAR10")
    return [Path(env).expanduser()] if env else [_REPO.parent / "shared" / "data" / "cifar10"]


def _checksums(folder: Path) -> dict[str, str]:
    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        return {}
    return {name.strip().lstrip("*"): digest for digest, name in
            (line.split(None, 1) for line in sums.read_text().splitlines() if line.strip())}


def cifar10_split(split: str) -> Path:
    """The ImageFolder root of CIFAR-10's `split` ('train' or 'test'), unpacked on first use."""
    if split not in SPLIT_SIZES:
        raise ValueError(f"unknown CIFAR-10 split {split!r}")
    target = cache_dir("cifar10") / split
    if target.is_dir():
        return target
    for source in _sources():
        if (source / split).is_dir():  # already unpacked by the user
            return source / split
        archive = source / f"{split}.tar.gz"
        if archive.is_file():
            return _unpack(archive, target, _checksums(source).get(archive.name))
    raise VitqError(f"CIFAR-10 {split} images not found (looked for {split}.tar.gz or {split}/ in "
                    f"{', '.join(str(s) for s in _sources())}); set VITQ_CIFAR10 to the folder holding them, or pass "
                    "--calib/--eval folders of your own")


def _unpack(archive: Path, target: Path, expected_sha256: str | None) -> Path:
    if expected_sha256:
        if file_sha256(archive) != expected_sha256:
            raise VitqError(f"{archive} does not match its SHA256SUMS entry; fetch it again")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.tmp-") as tmp:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")  # refuses links out of the folder, absolute paths, devices
        unpacked = Path(tmp) / target.name
        if not unpacked.is_dir():
            raise VitqError(f"{archive} holds no {target.name}/ folder; is it the CIFAR-10 archive?")
        shutil.move(str(unpacked), target)
    return target


def cifar10_images(split: str) -> ImageSet:
    """CIFAR-10's `split` with the classes interleaved, so that any first N images are balanced."""
    images = image_folder(cifar10_split(split)).interleaved()
    return replace(images, name=f"cifar10-{split} (classes interleaved)")


def cifar10_validation(n: int) -> ImageSet:
    """n training images from VALIDATION_START on (balanced, never calibrated on, never the test split):
    where the tools choose settings and arithmetic."""
    images = cifar10_images("train").subset(range(VALIDATION_START, VALIDATION_START + n))
    return replace(images, name=f"cifar10-train positions {VALIDATION_START}+ (validation)")
