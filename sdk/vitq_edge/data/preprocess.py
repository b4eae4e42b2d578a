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

from vitq_edge.data.options import INTERPOLATIONS

_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


assert tuple(_INTERPOLATION) == INTERPOLATIONS


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit grayscale scaled to 8 bits (PIL's convert would clip it at 255).

    PIL opens 16-bit grayscale PNG/TIFF as "I;16" (older versions and some formats as
    32-bit "I" holding 0..65535); 48-bit RGB and 16-bit gray+alpha it reduces to 8 bits
    itself.
    """
    if image.mode.startswith("I;16") or image.mode == "I":
        wide = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        return Image.fromarray(((wide + 128) // 257).astype(np.uint8), "L")  # 65535 / 255 = 257
    return image


@dataclass(frozen=True)
class Preprocess:
    channels: int
    size: tuple[int, int]  # (height, width)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    crop_pct: float = 1.0

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem:
            raise ValueError(problem)

    def _problem(self) -> str | None:
        """What is wrong with these fields (None: nothing); they may come from a damaged manifest."""
        def is_int(v: object) -> bool:
            return type(v) is int

        def is_number(v: object) -> bool:
            return type(v) in (int, float) and math.isfinite(v)

        if self.channels not in (1, 3) or not is_int(self.channels):
            return f"channels is {self.channels!r}, not 1 or 3"
        if len(self.size) != 2 or not all(is_int(v) and v > 0 for v in self.size):
            return f"size is {list(self.size)!r}, not two positive integers"
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != self.channels or not all(is_number(v) for v in values):
                return f"{name} is {list(values)!r}, not {self.channels} finite number(s)"
        if not all(v > 0 for v in self.std):
            return f"std is {list(self.std)!r}; every value must be positive"
        if self.interpolation not in _INTERPOLATION:
            return f"interpolation is {self.interpolation!r}, not one of {', '.join(_INTERPOLATION)}"
        if not is_number(self.crop_pct) or not 0 < self.crop_pct <= 1:
            return f"crop_pct is {self.crop_pct!r}, not a number in (0, 1]"
        return None

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
        """The manifest's "input" object; ValueError naming the first missing or bad field."""
        missing = [k for k in ("channels", "size", "mean", "std", "interpolation", "crop_pct") if k not in d]
        if missing:
            raise ValueError(f"no '{missing[0]}'")
        if not all(isinstance(d[k], list) for k in ("size", "mean", "std")):
            raise ValueError("size, mean and std must be lists")
        return cls(channels=d["channels"], size=tuple(d["size"]), mean=tuple(d["mean"]),
                   std=tuple(d["std"]), interpolation=d["interpolation"], crop_pct=d["crop_pct"])

    def __call__(self, image: Image.Image) -> np.ndarray:
        """PIL image (any mode) -> float32 array [C, H, W]."""
        image = to_8bit(image).convert("L" if self.channels == 1 else "RGB")
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
