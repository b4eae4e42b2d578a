"""Which quantizers cost a recipe its accuracy on the real model: each group of quantizers alone,
and all but one group, against the float model on a validation split carved from the training data.

    .venv/bin/python tools/quantizer_ablation.py --recipe minmax --bits W8A8
    .venv/bin/python tools/quantizer_ablation.py --recipe minmax --bits W8A8 --probs log:8
    .venv/bin/python tools/quantizer_ablation.py --recipe liu2021 --bits W8A8 --search
    .venv/bin/python tools/quantizer_ablation.py --recipe adfq --bits W6A6 --probs log:4 --groups probabilities
    .venv/bin/python tools/quantizer_ablation.py --recipe adfq --bits W6A6 --gelu log:4 --groups fc2
    .venv/bin/python tools/quantizer_ablation.py --recipe adfq --bits W8A8 --option gelu_quantizer=shift-log2

Calibration: the first `--calib-images` training images (classes interleaved), as a build takes
them; validation: `--val-images` training images from interleaved position 5,000 on (never the
test split). Ranges come from the recipe's own quantizers and their initialisation (no
reconstruction or search: this measures what the quantizer types and their ranges cost), or,
with `--search` (liu2021), from its interval search on its default search images, to see
which groups the searched intervals cost (the bias corrections it made stay in every row).
`--option KEY=VALUE` sets a recipe option (as `vitq-edge build --option` does), e.g. adfq's
gelu_quantizer or uniform_init, to compare its choices.
The forward is the fake-quant one, which agrees with the kernels' arithmetic to float rounding.
Writes OUT.{md,json}.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch
import vitq_edge  # noqa: F401  (torchvision shim before timm)
from vitq_edge.artifacts import write_measurement
from vitq_edge.data.cifar10 import VALIDATION_START, cifar10_images, cifar10_validation
from vitq_edge.errors import VitqError
from vitq_edge.lifetime import run_script
from vitq_edge.metrics import accuracy_summary
from vitq_edge.models.dinov2 import MODEL_NAME
from vitq_edge.models.source import load_model
from vitq_edge.quant import vit
from vitq_edge.quant.adfq import adfq_factory
from vitq_edge.quant.liu2021 import liu_factory, search_intervals
from vitq_edge.quant.minmax import minmax_factory
from vitq_edge.quant.quantizers import LogQuantizer, ShiftLog2Quantizer
from vitq_edge.recipes import layer_bits, parse_bits, parse_options, recipe_config

REPO = Path(__file__).resolve().parents[1]

# Group name -> (op path suffixes, roles). Post-LayerNorm inputs are those of qkv and fc1.
GROUPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "weights": (("",), ("weight",)),
    "post-LN inputs (qkv, fc1)": ((".qkv", ".fc1"), ("input",)),
    "probabilities (A@V a)": ((".av",), ("a",)),
    "q, k, v": ((".qk", ".av"), ("a", "b")),
    "proj input": ((".proj",), ("input",)),
    "fc2 input (post-GELU)": ((".fc2",), ("input",)),
    "patch / head inputs": (("patch_embed.proj", "head"), ("input",)),
}


def _group_of(op: str, role: str) -> str:
    if role == "weight":
        return "weights"
    if op.endswith(".av") and role == "a":
        return "probabilities (A@V a)"
    for name, (suffixes, roles) in GROUPS.items():
        if name not in ("weights", "probabilities (A@V a)") and role in roles and op.endswith(suffixes):
            return name
    raise ValueError(f"no group for {op} {role}")


def _ladder(value: str | None, flag: str) -> int | None:
    """K of a `log:K` option value (steps per octave), None when the option is absent."""
    if value is None:
        return None
    kind, _, k = value.partition(":")
    if kind != "log" or not k.isdigit() or int(k) < 1:
        raise VitqError(f"{flag} {value}: expected log:K with K >= 1 steps per octave, e.g. {flag} log:4")
    return int(k)


def _factory(recipe: str, bits: str, probs: int | None, gelu: int | None, options: dict[str, str]):
    _, a_bits = parse_bits(bits)
    config = recipe_config(recipe, bits, **options)  # the recipe's widths per layer (its head_bits too)
    if recipe == "minmax":
        base = minmax_factory(layer_bits(config))
    elif recipe == "liu2021":
        base = liu_factory(layer_bits(config))
    else:
        base = adfq_factory(config)
    groups: dict[int, str] = {}  # id(quantizer) -> group

    def make(op: str, role: str):
        if probs and op.endswith(".av") and role == "a":
            q = LogQuantizer(a_bits, steps_per_octave=probs)
        elif gelu and op.endswith(".fc2") and role == "input":
            q = ShiftLog2Quantizer(a_bits, steps_per_octave=gelu)
        else:
            q = base(op, role)
        groups[id(q)] = _group_of(op, role)
        return q

    return make, groups


def _logits(model: torch.nn.Module, xs: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad(), vit.arithmetic("fake-quant"):
        return torch.cat([model(x) for x in xs])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", choices=("minmax", "liu2021", "adfq"), default="minmax")
    ap.add_argument("--bits", default="W8A8")
    ap.add_argument("--probs", default=None, help="log:K replaces the probability quantizer with a log one, "
                                                  "K levels per octave")
    ap.add_argument("--gelu", default=None, help="log:K replaces the post-GELU (fc2 input) quantizer with a "
                                                 "Shift-Log2 one, K levels per octave")
    ap.add_argument("--search", action="store_true", help="liu2021: its interval search sets the ranges")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="a recipe option, as for vitq-edge build (repeatable)")
    ap.add_argument("--groups", default=None, help="comma-separated group names (or their first words, e.g. "
                                                   "probabilities,weights): only these groups' rows")
    ap.add_argument("--calib-images", type=int, default=256)
    ap.add_argument("--val-images", type=int, default=512)
    ap.add_argument("--out", default=None,
                    help="default docs/ablation/RECIPE-BITS[-probslogK][-gelulogK][-searched][-KEY-VALUE][-GROUPS]")
    args = ap.parse_args()
    probs, gelu = _ladder(args.probs, "--probs"), _ladder(args.gelu, "--gelu")
    options = parse_options(args.option)
    recipe_config(args.recipe, args.bits, **options)  # a bad option stops here, before the model loads
    if args.search and args.recipe != "liu2021":
        raise VitqError("--search is liu2021's interval search; drop it or use --recipe liu2021")
    groups_run = [g for g in GROUPS if args.groups is None
                  or any(g.startswith(w.strip()) for w in args.groups.split(",") if w.strip())]
    if not groups_run:
        raise VitqError(f"--groups {args.groups}: no such group; use the first words of {', '.join(GROUPS)}")
    command = "python tools/quantizer_ablation.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    tag = (f"{args.recipe}-{args.bits}" + (f"-probslog{probs}" if probs else "")
           + (f"-gelulog{gelu}" if gelu else "") + ("-searched" if args.search else "")
           + "".join(f"-{k}-{v}" for k, v in options.items()))
    if args.groups:
        tag += "-" + "-".join(g.split()[0].rstrip(",") for g in groups_run)
    out = Path(args.out or REPO / "docs" / "ablation" / tag)
    torch.manual_seed(0)
    loaded = load_model(MODEL_NAME)
    train = cifar10_images("train")
    calib = [x for x, _ in train.subset(range(args.calib_images)).batches(loaded.preprocess, 32)]
    val_set = cifar10_validation(args.val_images)
    val = [x for x, _ in val_set.batches(loaded.preprocess, 32)]
    labels = torch.from_numpy(val_set.labels)
    with torch.no_grad():
        fp32 = torch.cat([loaded.model(x) for x in val])
    make, groups = _factory(args.recipe, args.bits, probs, gelu, options)
    start = time.time()
    qmodel = vit.quantize_vit(loaded.model, make)
    vit.calibrate_activations(qmodel, calib)
    if args.search:
        config = recipe_config("liu2021", args.bits)
        search_intervals(qmodel, torch.cat(calib)[: config.search_images], config)
    print(f"calibrated in {time.time() - start:.0f} s", file=sys.stderr)
    qs = [q for _, q in vit.quantizers(qmodel) if id(q) in groups]

    def run(name: str, on) -> dict:
        for q in qs:
            q.enabled = on(groups[id(q)])
        logits = _logits(qmodel, val)
        acc = accuracy_summary(fp32, logits, logits, labels)  # the definitions build and compare report
        row = {"quantized": name, "top1": acc["simulated"], "agreement": acc["agreement"], "sqnr_db": acc["sqnr_db"]}
        print(row, file=sys.stderr)
        return row

    rows = [run("all", lambda g: True)]
    rows += [run(f"only {g}", lambda h, g=g: h == g) for g in groups_run]
    rows += [run(f"all but {g}", lambda h, g=g: h != g) for g in groups_run]
    fp32_top1 = accuracy_summary(fp32, fp32, fp32, labels)["fp32"]
    result = {"command": command, "recipe": args.recipe, "bits": args.bits, "probs": args.probs, "gelu": args.gelu,
              "search": args.search, "options": options,
              "calib_images": args.calib_images, "val_images": args.val_images, "fp32_top1": fp32_top1,
              "rows": rows}
    ladders = (f" probabilities {args.probs}" if probs else "") + (f" post-GELU {args.gelu}" if gelu else "")
    ladders += "".join(f" {k}={v}" for k, v in options.items())
    lines = [f"# {args.recipe} {args.bits}{ladders}: "
             "which quantizers cost accuracy (real model, validation split)", "", f"    {command}", "",
             f"dinov2-s14-cifar10; calibration on {args.calib_images} training images; {args.val_images} validation "
             f"images (training positions {VALIDATION_START}+); float top-1 {fp32_top1:.2f}%; fake-quant forward, "
             + ("ranges from liu2021's interval search (its bias corrections in every row)." if args.search
                else "no reconstruction or search."), "",
             "| quantized | top-1 % | agreement % | SQNR dB |", "|---|---:|---:|---:|"]
    lines += [f"| {r['quantized']} | {r['top1']:.2f} | {r['agreement']:.2f} | {r['sqnr_db']} |" for r in rows]
    write_measurement(out, result, lines)


if __name__ == "__main__":
    run_script(main)
