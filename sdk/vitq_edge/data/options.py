"""What the CLI offers for reading images, and the checks it runs, without importing the readers
(numpy, PIL, torch): a usage error answers at once."""

from __future__ import annotations

from pathlib import Path

from vitq_edge.errors import VitqError

# Resize interpolations, by timm's names (data/preprocess.py maps them to PIL's filters).
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")

# Larger images are refused before decoding (`--max-image-pixels`): a decompression bomb
# of a few KB can declare billions of pixels. 2**28 (268 M pixels, 16384 x 16384) admits
# any real photo; decoding one that large takes ~0.8 GB (RGB).
DEFAULT_MAX_IMAGE_PIXELS = 1 << 28


def check_data_folder(root: Path) -> list[str]:
    """The class folder names of an ImageFolder root (sorted, hidden ones skipped), or a VitqError
    that says what is wrong with it. Reads no image."""
    if root.is_file():
        raise VitqError(f"data path {root} is a file; pass a folder with one subfolder per class")
    if not root.is_dir():
        raise VitqError(f"data folder {root} does not exist; pass a folder with one subfolder per class")
    try:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except PermissionError:
        raise VitqError(f"data folder {root} is not readable; check its permissions") from None
    real_root = root.resolve()
    for cls in classes:
        target = (root / cls).resolve()
        if target == real_root or real_root.is_relative_to(target):
            raise VitqError(f"class folder {root / cls} is a link to {target}, which holds the data folder "
                            "itself: its images would count twice; remove the link")
    return classes
