#!/usr/bin/env python3
"""Train the bundled reference ViT on Fashion-MNIST and write its assets.

    python tools/train_reference.py [--data /usr/share/datasets/fashion-mnist] [--epochs 24]

Writes into sdk/vitq_edge/assets/reference/:
  weights.pt   half-precision state dict (checked to score the same as fp32)
  meta.json    timm config, normalization, class names, accuracy, the command
  calib.npz    1024 images from the training split (calibration)
  eval.npz     the full 10,000-image test split (evaluation)
Runs on 2 CPU cores in about an hour; a per-epoch checkpoint in work/train/ lets
`--resume` continue an interrupted run.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import vitq_edge
from vitq_edge.data.fashion_mnist import CLASS_NAMES, DEBIAN_DIR, load_split
from vitq_edge.models.reference import (
    REFERENCE_CONFIG,
    REFERENCE_MEAN,
    REFERENCE_NAME,
    REFERENCE_STD,
    assets_dir,
    create_reference_vit,
)

CALIB_IMAGES = 1024


def normalize(images_u8: torch.Tensor) -> torch.Tensor:
    x = images_u8.float().div_(255.0).unsqueeze(1)
    return (x - REFERENCE_MEAN[0]) / REFERENCE_STD[0]


def augment(images_u8: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 2-pixel shifts and horizontal flips (both label-preserving for clothes)."""
    n = images_u8.shape[0]
    padded = F.pad(images_u8, (2, 2, 2, 2))
    offsets = torch.randint(0, 5, (n, 2), generator=gen)
    flips = torch.rand(n, generator=gen) < 0.5
    out = torch.empty_like(images_u8)
    for i in range(n):
        dy, dx = offsets[i].tolist()
        crop = padded[i, dy : dy + 28, dx : dx + 28]
        out[i] = crop.flip(-1) if flips[i] else crop
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), 500):
        logits = model(normalize(images[i : i + 500]))
        correct += (logits.argmax(-1) == labels[i : i + 500]).sum().item()
    return 100.0 * correct / len(images)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEBIAN_DIR), help="directory with the four IDX files")
    ap.add_argument("--epochs", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="work/train", help="checkpoint directory")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--out", default=str(assets_dir()))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    train_x, train_y = (torch.from_numpy(a.copy()) for a in load_split("train", args.data))
    test_x, test_y = (torch.from_numpy(a.copy()) for a in load_split("test", args.data))

    model = create_reference_vit()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = len(train_x) // args.batch_size
    total_steps = args.epochs * steps_per_epoch
    warmup = steps_per_epoch

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, total_steps - warmup)
        return args.lr * 0.5 * (1 + math.cos(math.pi * t))

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt_path = work / "checkpoint.pt"
    start_epoch = 0
    history: list[dict] = []
    if args.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        gen.set_state(ckpt["gen"])
        start_epoch, history = ckpt["epoch"], ckpt["history"]

    for epoch in range(start_epoch, args.epochs):
        model.train()
        t0 = time.time()
        perm = torch.randperm(len(train_x), generator=gen)
        total_loss = 0.0
        for s in range(steps_per_epoch):
            step = epoch * steps_per_epoch + s
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            idx = perm[s * args.batch_size : (s + 1) * args.batch_size]
            x = normalize(augment(train_x[idx], gen))
            loss = F.cross_entropy(model(x), train_y[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total_loss += loss.item()
        acc = evaluate(model, test_x, test_y)
        history.append(dict(epoch=epoch + 1, loss=total_loss / steps_per_epoch, test_top1=acc,
                            seconds=round(time.time() - t0, 1)))
        print(json.dumps(history[-1]), flush=True)
        torch.save(dict(model=model.state_dict(), opt=opt.state_dict(), gen=gen.get_state(),
                        epoch=epoch + 1, history=history), ckpt_path)

    fp32_acc = evaluate(model, test_x, test_y)
    half_state = {k: v.half() for k, v in model.state_dict().items()}
    model_half = create_reference_vit()
    model_half.load_state_dict({k: v.float() for k, v in half_state.items()})
    fp16_acc = evaluate(model_half, test_x, test_y)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(half_state, out / "weights.pt")
    rng = np.random.default_rng(args.seed)
    calib_idx = np.sort(rng.choice(len(train_x), CALIB_IMAGES, replace=False))
    np.savez_compressed(out / "calib.npz", images=train_x.numpy()[calib_idx],
                        labels=train_y.numpy()[calib_idx], source_indices=calib_idx)
    np.savez_compressed(out / "eval.npz", images=test_x.numpy(), labels=test_y.numpy())
    meta = dict(
        name=REFERENCE_NAME,
        architecture="timm.models.vision_transformer.VisionTransformer",
        config=REFERENCE_CONFIG,
        input=dict(size=[1, 28, 28], mean=list(REFERENCE_MEAN), std=list(REFERENCE_STD),
                   interpolation="bilinear", crop_pct=1.0),
        labels=list(CLASS_NAMES),
        dataset="Fashion-MNIST (IDX files of Debian's dataset-fashion-mnist)",
        calibration=f"{CALIB_IMAGES} images from the training split, seed {args.seed}",
        evaluation="the full 10,000-image test split",
        test_top1_fp32=round(fp32_acc, 2),
        test_top1_fp16_weights=round(fp16_acc, 2),
        history=history,
        vitq_edge_version=vitq_edge.__version__,
        torch_version=torch.__version__,
        command="python " + " ".join(shlex.quote(a) for a in sys.argv),
    )
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"fp32 top-1 {fp32_acc:.2f}%  fp16-weights top-1 {fp16_acc:.2f}%  -> {out}")


if __name__ == "__main__":
    main()
