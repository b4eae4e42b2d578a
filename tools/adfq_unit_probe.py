"""A cheap proxy for choosing `adfq`'s reconstruction settings on the real model: reconstruct a few
units under each setting and score them on held-out images, instead of calibrating the whole model.

    .venv/bin/python tools/adfq_unit_probe.py --units blocks.6.attn,blocks.6.mlp --setting base: \
        --setting lr15:weight_lr=0.045,act_lr=6e-4 --setting b8:batch_size=8,iters=800 \
        --setting b8-lr3.75:batch_size=8,iters=800,weight_lr=0.01125,act_lr=1.5e-4 --name schedule

Each setting starts from the same state (W4A4 recipe defaults; activation ranges from the float
model on the build's 1,024 calibration images) and reconstructs each unit alone on its float input,
with --iters iterations of the paper's 32 images at the paper's learning rates (scale_lr=false)
unless the setting says otherwise. Score: the unit's output error against the float unit (squared error summed over
channels, mean per token, the reconstruction loss's definition) on `--val-images` held-out training
images (vitq_edge.data.cifar10.cifar10_validation), after the rounding is hardened as the build does.
Writes docs/validation/unit-probe-NAME.{md,json} as settings finish.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import vitq_edge  # noqa: F401  (torchvision shim before timm)
from vitq_edge.artifacts import write_atomic
from vitq_edge.data.cifar10 import cifar10_validation
from vitq_edge.errors import VitqError
from vitq_edge.lifetime import run_script
from vitq_edge.models.dinov2 import MODEL_NAME
from vitq_edge.models.source import default_data, load_model
from vitq_edge.quant import adfq, vit
from vitq_edge.quant.calibration import BlockInputs, batches
from vitq_edge.quant.quantizers import PerPatchOutlierQuantizer, ShiftLog2Quantizer
from vitq_edge.recipes import parse_options, recipe_config

REPO = Path(__file__).resolve().parents[1]
# Config fields the shared start state was built with (quantizers, activation ranges); round_gradient is
# set on each setting's copy of the quantizers instead.
FIXED = {"bits", "qkv_threshold", "fc1_threshold", "log_base", "act_calibration", "device"}


def _images(images, preprocess) -> torch.Tensor:
    return torch.cat([x for x, _ in images.batches(preprocess, 64)])


def _unit_inputs(qmodel: torch.nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    vit.set_enabled(qmodel, False)
    cache = BlockInputs(qmodel, x, 256)
    return {n: cache.of(n, qmodel.get_submodule(n))[0] for n in names}


@torch.no_grad()
def _heldout_error(unit: torch.nn.Module, x: torch.Tensor) -> float:
    adfq._set_unit_enabled(unit, False)
    with vit.arithmetic("fake-quant"):
        ref = torch.cat([unit(b) for b in batches(x, 64)])
    adfq._set_unit_enabled(unit, True)
    out = torch.cat([unit(b) for b in batches(x, 64)])  # the deployed (kernel-exact) arithmetic
    return float((out - ref).pow(2).sum(-1).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", default="blocks.5.attn,blocks.5.mlp")
    ap.add_argument("--bits", default="W4A4")
    ap.add_argument("--iters", type=int, default=200, help="iterations per unit unless a setting says otherwise")
    ap.add_argument("--setting", action="append", required=True,
                    help="NAME:KEY=VALUE,... adfq config fields for one setting (repeatable; NAME: alone = defaults)")
    ap.add_argument("--val-images", type=int, default=128)
    ap.add_argument("--calib-images", type=int, default=None, help="default: the build's (1,024)")
    ap.add_argument("--name", required=True)
    args = ap.parse_args()
    command = "python tools/adfq_unit_probe.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    names = args.units.split(",")

    settings = []  # checked before the start state is built (minutes on the real model)
    for spec in args.setting:
        label, _, opts = spec.partition(":")
        overrides = parse_options([o for o in opts.split(",") if o])
        coerced = recipe_config("adfq", args.bits, **overrides)  # typed and checked as --option would be
        if FIXED & set(overrides):
            raise VitqError(f"setting {label}: the start state every setting shares fixes "
                            f"{', '.join(sorted(FIXED & set(overrides)))}; compare its values with "
                            "tools/validation_compare.py --option")
        settings.append((label, opts, {k: getattr(coerced, k) for k in overrides}))

    loaded = load_model(MODEL_NAME)
    calib, limit = default_data(MODEL_NAME, "calib")
    x_cal = _images(calib.limit(args.calib_images or limit), loaded.preprocess)
    x_val = _images(cifar10_validation(args.val_images), loaded.preprocess)
    # The paper's batch and learning rates as they are; settings change them explicitly.
    base = replace(recipe_config("adfq", args.bits), iters=args.iters, batch_size=adfq.PAPER_BATCH, scale_lr=False)
    qmodel = vit.quantize_vit(loaded.model, adfq.adfq_factory(base))
    vit.calibrate_activations(qmodel, batches(x_cal, base.batch_size * 8))
    cal_in, val_in = _unit_inputs(qmodel, x_cal, names), _unit_inputs(qmodel, x_val, names)
    start = {n: copy.deepcopy(qmodel.get_submodule(n)) for n in names}

    rows = []
    out = REPO / "docs" / "validation" / f"unit-probe-{args.name}"
    torch.set_flush_denormal(True)
    for label, opts, overrides in settings:
        config = replace(base, **overrides)
        row = {"setting": label, "options": opts, "config": asdict(config), "units": {}}
        for n in names:
            unit = copy.deepcopy(start[n])
            for q in unit.modules():
                if isinstance(q, PerPatchOutlierQuantizer | ShiftLog2Quantizer):
                    q.round_gradient = config.round_gradient == "ste"
            adfq._set_unit_enabled(unit, True)
            before = _heldout_error(unit, val_in[n])
            t0 = time.perf_counter()
            adfq.reconstruct_unit(unit, cal_in[n], cal_in[n], config, torch.Generator().manual_seed(config.seed),
                                  f"{label} {n}")
            seconds = time.perf_counter() - t0
            row["units"][n] = {"heldout_error_before": before, "heldout_error": _heldout_error(unit, val_in[n]),
                               "seconds": round(seconds, 1)}
            print(label, n, row["units"][n], flush=True)
        rows.append(row)
        text = json.dumps({"command": command, "rows": rows}, indent=2) + "\n"
        write_atomic(out.with_suffix(".json"), lambda f, text=text: f.write(text.encode()))
        md = _markdown(rows, names, command, args)
        write_atomic(out.with_suffix(".md"), lambda f, md=md: f.write(md.encode()))


def _markdown(rows: list[dict], names: list[str], command: str, args: argparse.Namespace) -> str:
    lines = [f"# adfq unit probe: {args.name}", "", f"    {command}", "",
             f"dinov2-s14-cifar10 {args.bits}; each unit reconstructed alone from the same start, scored on "
             f"{args.val_images} held-out training images (validation split): output squared error against the "
             "float unit, summed over channels, mean per token. Lower is better; time on this machine.", "",
             "| setting | options | " + " | ".join(f"{n} error (start) | s" for n in names) + " |",
             "|---|---|" + "---:|---:|" * len(names)]
    for r in rows:
        cells = [f"{r['units'][n]['heldout_error']:.4g} ({r['units'][n]['heldout_error_before']:.4g}) | "
                 f"{r['units'][n]['seconds']:.0f}" for n in names if n in r["units"]]
        options = r["options"] or f"--iters {args.iters}"
        lines.append(f"| {r['setting']} | `{options}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_script(main)
