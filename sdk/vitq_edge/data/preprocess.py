"""Preprocessing resolved from timm's data config, applied with PIL and numpy.

timm's eval transform is: resize the shorter side to floor(size / crop_pct) with the
configured interpolation, center-crop to size, scale to [0, 1], normalize by mean/std.
We apply exactly that here (without torchvision), record it in the manifest, and
apply it again on the host before a device run, so every path sees the same tensor.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class Preprocess:
    channels: int
    size: tuple[int, int]  # (height, width)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    crop_pct: float = 1.0

    @property
    def resize_to(self) -> int:
        """Length of the shorter side before the center crop."""
        return int(math.floor(max(self.size) / self.crop_pct))

    def to_manifest(self) -> dict:
        d = asdict(self)
        d.update(size=list(self.size), mean=list(self.mean), std=list(self.std))
        d["shape"] = [1, self.channels, *self.size]
        d["dtype"] = "float32"
        d["resize_shorter_side"] = self.resize_to
        d["center_crop"] = list(self.size)
        return d

    @classmethod
    def from_manifest(cls, d: dict) -> Preprocess:
        return cls(channels=d["channels"], size=tuple(d["size"]), mean=tuple(d["mean"]),
                   std=tuple(d["std"]), interpolation=d["interpolation"], crop_pct=d["crop_pct"])

    def __call__(self, image: Image.Image) -> np.ndarray:
        """PIL image (any mode) -> float32 array [C, H, W]."""
        image = image.convert("L" if self.channels == 1 else "RGB")
        w, h = image.size
        target = self.resize_to
        if (w, h) != (self.size[1], self.size[0]):
            # Same truncation as torchvision.transforms.Resize(int).
            new_w, new_h = (target, int(target * h / w)) if w <= h else (int(target * w / h), target)
            if (new_w, new_h) != (w, h):
                image = image.resize((new_w, new_h), _INTERPOLATION[self.interpolation])
            left = (new_w - self.size[1]) // 2
            top = (new_h - self.size[0]) // 2
            image = image.crop((left, top, left + self.size[1], top + self.size[0]))
        x = np.asarray(image, dtype=np.float32) / 255.0
        x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
        mean = np.asarray(self.mean, dtype=np.float32).reshape(-1, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(-1, 1, 1)
        return np.ascontiguousarray((x - mean) / std, dtype=np.float32)
