"""The bundled reference model: a small timm VisionTransformer trained on Fashion-MNIST.

The shape follows DeiT-Tiny where it matters for quantization (pre-norm blocks of
LayerNorm -> 3-head attention with 64-wide heads -> LayerNorm -> GELU MLP, width 192,
a class token, a patch embedding), with 6 blocks and 7x7 patches so that the
28x28 images give 16 patches + 1 class token: cheap enough to train on 2 CPU cores
and to run under emulation in CI.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from timm.models.vision_transformer import VisionTransformer

REFERENCE_NAME = "vitq_reference_fmnist"

REFERENCE_CONFIG = dict(
    img_size=28,
    patch_size=7,
    in_chans=1,
    num_classes=10,
    embed_dim=192,
    depth=6,
    num_heads=3,
    mlp_ratio=4.0,
    class_token=True,
    global_pool="token",
)

# Fashion-MNIST pixel statistics over the training split (pixels scaled to [0, 1]).
REFERENCE_MEAN = (0.2860,)
REFERENCE_STD = (0.3530,)


def create_reference_vit() -> VisionTransformer:
    """An untrained reference ViT (the architecture only)."""
    return VisionTransformer(**REFERENCE_CONFIG)


def assets_dir() -> Path:
    return Path(str(resources.files("vitq_edge") / "assets" / "reference"))


@dataclass(frozen=True)
class ReferenceAssets:
    weights: Path
    meta: Path
    calib: Path
    eval: Path


def reference_assets() -> ReferenceAssets:
    d = assets_dir()
    return ReferenceAssets(
        weights=d / "weights.pt", meta=d / "meta.json", calib=d / "calib.npz", eval=d / "eval.npz"
    )


def load_reference_meta() -> dict:
    return json.loads(reference_assets().meta.read_text())
