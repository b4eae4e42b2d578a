"""`vitq-edge build`: model -> calibration -> quantized model -> .pte -> manifest and report.

One direction, no back and forth. Accuracy is measured three ways on the same images
in one pass: the float model, the simulated quantized model, and the lowered .pte in
ExecuTorch's runtime on this machine.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from executorch.version import __version__ as EXECUTORCH_VERSION

import vitq_edge
from vitq_edge.artifacts import (
    BUILD_FORMAT,
    MANIFEST,
    PROGRAM,
    REPORT,
    staged_dir,
    write_json,
)
from vitq_edge.build_options import BuildOptions, check_build_options
from vitq_edge.data.datasets import ImageSet, image_folder
from vitq_edge.device.host_runtime import HostProgram
from vitq_edge.errors import VitqError
from vitq_edge.hostinfo import host_description, torch_description
from vitq_edge.lower.export import LoweredProgram, lower_to_executorch
from vitq_edge.metrics import accuracy_summary
from vitq_edge.models.source import LoadedModel, default_data, load_model
from vitq_edge.progress import progress
from vitq_edge.quant import QuantizedModel, quantize
from vitq_edge.quant.vit import simulate
from vitq_edge.recipes import PaperRecipeConfig
from vitq_edge.report import render_report
from vitq_edge.runtime import ARITHMETIC_VERSION, KERNELS_VERSION
from vitq_edge.runtime import LIBRARY as KERNELS_LIBRARY


@dataclass
class BuildResult:
    out: Path
    manifest: dict


def _apply_overrides(loaded: LoadedModel, opts: BuildOptions) -> None:
    pre = loaded.preprocess
    channels = pre.channels
    for flag, values in (("--mean", opts.mean), ("--std", opts.std)):
        if values is not None and len(values) not in (1, channels):
            raise VitqError(f"{flag} needs 1 or {channels} values for a {channels}-channel model, got {len(values)}")
    mean = tuple(opts.mean) * (channels // len(opts.mean)) if opts.mean else pre.mean
    std = tuple(opts.std) * (channels // len(opts.std)) if opts.std else pre.std
    size = (opts.input_size, opts.input_size) if opts.input_size else pre.size
    try:
        loaded.preprocess = replace(pre, mean=mean, std=std, size=size,
                                    crop_pct=pre.crop_pct if opts.crop_pct is None else opts.crop_pct,
                                    interpolation=opts.interpolation or pre.interpolation)
    except ValueError as exc:
        raise VitqError(f"bad preprocessing override: {exc}; fix --mean/--std/--input-size/--crop-pct/"
                        "--interpolation") from None


def eval_images(loaded: LoadedModel, folder: str | None, limit: int | None, max_pixels: int) -> ImageSet:
    """The evaluation images of a build (--eval, or the model's default set), checked against the model."""
    data = _images(folder, loaded, "eval", limit, max_pixels)
    _check_classes(loaded, data, "--eval")
    return data


def _images(folder: str | None, loaded: LoadedModel, kind: str, limit: int | None, max_pixels: int) -> ImageSet:
    """--calib/--eval images, or the model's own default set (`models.source.default_data`)."""
    if folder:
        labels = loaded.labels if kind == "eval" else None  # calibration ignores labels
        return image_folder(folder, labels=labels, max_pixels=max_pixels).limit(limit)
    images, default_limit = default_data(loaded.name, kind)
    return images.limit(limit or default_limit)


def _check_classes(loaded: LoadedModel, data: ImageSet, flag: str) -> None:
    if len(data.class_names) != loaded.num_classes:
        raise VitqError(
            f"the model has {loaded.num_classes} classes but {flag} data '{data.name}' has "
            f"{len(data.class_names)}; pass {flag} DIR with matching class folders, set "
            f"--model-kwargs num_classes={len(data.class_names)} with a matching checkpoint, or use --skip-eval"
        )


def _check_input_size(loaded: LoadedModel) -> None:
    expected = tuple(loaded.model.patch_embed.img_size)
    if tuple(loaded.preprocess.size) != expected:
        raise VitqError(f"--input-size {loaded.preprocess.size[0]} does not match the model's img_size "
                        f"{expected[0]}; also pass --model-kwargs img_size={loaded.preprocess.size[0]}")


def _quantization_summary(quantized: QuantizedModel, lowered: LoweredProgram) -> dict | None:
    """Paper recipes: packed size and what each quantizer is (thresholds, outliers kept, bits)."""
    if quantized.size_bytes is None:
        return None
    return {
        "packed_size_bytes": quantized.size_bytes,
        "program_arithmetic": lowered.arithmetic,
        "arithmetic_version": ARITHMETIC_VERSION,
        **quantized.details,
    }


def _evaluate(loaded: LoadedModel, quantized: torch.nn.Module, program: HostProgram,
              data: ImageSet, batch_size: int) -> dict:
    logits: dict[str, list[torch.Tensor]] = {"fp32": [], "simulated": [], "pte": [], "labels": []}
    batches = data.batches(loaded.preprocess, batch_size)
    total = -(-len(data) // batch_size)
    with torch.no_grad():
        for x, y in progress(batches, "evaluating", total=total, unit="batch"):
            fp = loaded.model(x)
            # The fp32 recipe simulates with the float model itself: run it once.
            sim = fp if quantized is loaded.model else simulate(quantized, x)
            for key, out in (("fp32", fp), ("simulated", sim), ("pte", program(x)), ("labels", y)):
                logits[key].append(out)
    acc = accuracy_summary(*(torch.cat(logits[k]) for k in ("fp32", "simulated", "pte", "labels")))
    acc["eval_set"] = data.name
    if data.class_mapping:
        acc["class_mapping"] = data.class_mapping
    return acc


def load_for_build(opts: BuildOptions) -> LoadedModel:
    """The float model with the build's preprocessing overrides applied and checked."""
    if opts.model is None and opts.pretrained:
        raise VitqError("--pretrained needs --model NAME (a timm model)")
    loaded = load_model(opts.model, pretrained=opts.pretrained, checkpoint=opts.checkpoint,
                        model_kwargs=opts.model_kwargs)
    _apply_overrides(loaded, opts)
    _check_input_size(loaded)
    return loaded


Evaluator = Callable[[LoadedModel, torch.nn.Module, HostProgram], dict]


def build(opts: BuildOptions, evaluate: Evaluator | None = None, loaded: LoadedModel | None = None) -> BuildResult:
    """Run a whole build; raises VitqError on user errors, leaves no partial output.

    `vitq-edge compare` builds many programs of one model: it passes the model it loaded once
    (`load_for_build(opts)`: the same weights in every row, random ones included) and
    `evaluate(loaded, simulated model, program)`, which replaces the build's own accuracy step
    with one on images it prepared once.
    """
    t_start = time.time()
    checked = check_build_options(opts)
    target, config, out = checked.target, checked.config, checked.out

    loaded = loaded or load_for_build(opts)
    calib = _images(opts.calib, loaded, "calib", opts.calib_limit, opts.max_image_pixels)
    eval_set = None
    if not opts.skip_eval and evaluate is None:
        eval_set = eval_images(loaded, opts.eval, opts.eval_limit, opts.max_image_pixels)

    with staged_dir(out) as stage:
        example = (torch.zeros(1, loaded.preprocess.channels, *loaded.preprocess.size),)
        calib_total = -(-len(calib) // opts.batch_size)
        calib_batches = (x for x, _ in progress(calib.batches(loaded.preprocess, opts.batch_size),
                                                 "calibrating", total=calib_total, unit="batch"))
        t0 = time.time()
        quantized = quantize(loaded.model, config, calib_batches, example)
        calib_seconds = time.time() - t0

        t0 = time.time()
        lowered = lower_to_executorch(quantized.module, example, integer=isinstance(config, PaperRecipeConfig))
        export_seconds = time.time() - t0
        pte_path = stage / PROGRAM
        pte_path.write_bytes(lowered.buffer)

        accuracy = None
        if evaluate is not None and not opts.skip_eval:
            accuracy = evaluate(loaded, quantized.module, HostProgram(lowered.buffer))
        elif eval_set is not None:
            accuracy = _evaluate(loaded, quantized.module, HostProgram(lowered.buffer), eval_set, opts.batch_size)

        manifest = {
            "format": BUILD_FORMAT,
            "vitq_edge_version": vitq_edge.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": opts.command,
            "model": {"name": loaded.name, "config": loaded.config, "checkpoint": loaded.checkpoint,
                      "checkpoint_sha256": loaded.checkpoint_sha256, "num_classes": loaded.num_classes,
                      "notes": loaded.notes},
            "target": {"name": target.name, "cpu": target.cpu, "abi": target.abi},
            "recipe": quantized.recipe,
            "bits": quantized.bits,
            "recipe_config": {"name": config.name, **asdict(quantized.config or config)},
            "float_ops": quantized.float_ops,
            "quantization": _quantization_summary(quantized, lowered),
            "input": loaded.preprocess.to_manifest(),
            "labels": loaded.labels or (eval_set.class_names if eval_set is not None else None),
            "calibration": {"set": calib.name, "images": len(calib), "seconds": round(calib_seconds, 1)},
            "accuracy": accuracy,
            "program": PROGRAM,
            "size_bytes": len(lowered.buffer),
            "xnnpack_partitions": lowered.delegate_calls,
            "non_delegated_ops": lowered.non_delegated_ops,
            "custom_ops": lowered.custom_ops,
            "kernels": {"library": KERNELS_LIBRARY, "version": KERNELS_VERSION} if lowered.custom_ops else None,
            "executorch_version": EXECUTORCH_VERSION,
            "torch_version": torch.__version__,
            # Where it was built: calibration's float rounding depends on the CPU (hostinfo.py).
            "host": host_description(),
            "torch": torch_description(),
            "timings_seconds": {"calibration": round(calib_seconds, 1), "export": round(export_seconds, 1),
                                "total": round(time.time() - t_start, 1)},
        }
        write_json(stage / MANIFEST, manifest)
        # Names from the file system may not be UTF-8 (they arrive as surrogate escapes).
        (stage / REPORT).write_text(render_report(manifest), encoding="utf-8", errors="backslashreplace")
    return BuildResult(out, manifest)

