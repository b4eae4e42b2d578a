"""Accuracy of every recipe x bit width, with the accuracy targets checked -> a `vitq-edge compare` table.

    .venv/bin/python tools/accuracy_table.py                 # bundled reference model, 10,000 test images
    .venv/bin/python tools/accuracy_table.py --split val     # 2,000 held-out training images (for choosing
                                                             # options; never the test set) -> docs/results-val
    .venv/bin/python tools/accuracy_table.py --only adfq@W4A4 --out /tmp/adfq
    .venv/bin/python tools/accuracy_table.py --model dinov2-s14-cifar10 --eval-limit 2000   # -> docs/results-real

A thin caller of `vitq-edge compare`: it builds each program (calibration on the model's
default training images), evaluates the float model, the simulation and the .pte on the same
images, and writes OUT.{md,json,png} as rows finish; a rerun resumes. What it adds: the
model's row list, the bundled model's validation split, and a "Targets" section that checks
the issues' done-when criteria against the rows (a missing row says so).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np
import vitq_edge  # noqa: F401  (torchvision shim before timm)
from vitq_edge.build_options import BuildOptions
from vitq_edge.compare import CompareOptions, compare, read_table, row_is_current, write_table
from vitq_edge.data.datasets import ImageSet
from vitq_edge.data.fashion_mnist import load_split
from vitq_edge.errors import VitqError
from vitq_edge.lifetime import run_script
from vitq_edge.models.dinov2 import MODEL_NAME as REAL_MODEL
from vitq_edge.models.dinov2 import probe_meta
from vitq_edge.models.reference import load_reference_meta, reference_assets

REPO = Path(__file__).resolve().parents[1]
PAPER_ROWS = [f"{r}@{b}" for r in ("minmax", "liu2021", "adfq") for b in ("W8A8", "W6A6", "W4A4")]
PROGRAMS = {"reference": ["fp32", *PAPER_ROWS, "liu2021@mixed:6", "liu2021@mixed:8"],
            REAL_MODEL: ["fp32", *PAPER_ROWS, "liu2021@mixed:6"]}
OUT = {("reference", "test"): "docs/results", ("reference", "val"): "docs/results-val",
       (REAL_MODEL, "test"): "docs/results-real"}
VAL_IMAGES = 2000
CALIBRATION_BUDGET_S = 3600  # issue 14: each paper recipe's default build of the real model within 60 minutes


def validation_set() -> ImageSet:
    """2,000 bundled-model training images that are not calibration images (seeded)."""
    images, labels = load_split("train")
    with np.load(reference_assets().calib) as z:
        calib_idx = set(z["source_indices"].tolist())
    rest = np.array([i for i in range(len(labels)) if i not in calib_idx])
    pick = np.sort(np.random.default_rng(1).choice(rest, VAL_IMAGES, replace=False))
    return ImageSet("fmnist-train-validation", load_reference_meta()["labels"], labels[pick].astype(np.int64),
                    _arrays=images[pick])


Check = tuple[str, bool | None]  # criterion, met (None: a row it needs is missing)


def _reference_checks(acc: dict[str, dict]) -> list[Check]:
    """Issue 'paper recipes' (bundled model)."""
    checks: list[Check] = []
    for recipe in ("minmax", "liu2021", "adfq"):
        r = acc.get(f"{recipe}@W8A8")
        checks.append((f"W8A8 {recipe}: drop <= 0.5 and agreement >= 99.5%",
                       None if r is None else r["drop"] <= 0.5 and r["agreement"] >= 99.5))
    for recipe in ("liu2021", "adfq"):
        r = acc.get(f"{recipe}@W6A6")
        checks.append((f"W6A6 {recipe}: drop <= 1.0", None if r is None else r["drop"] <= 1.0))
    a, m, liu = acc.get("adfq@W4A4"), acc.get("minmax@W4A4"), acc.get("liu2021@W4A4")
    both = a is not None and m is not None
    return checks + [
        ("W4A4 adfq: drop <= minmax drop / 3", a["drop"] <= m["drop"] / 3 if both else None),
        ("W4A4 adfq: drop <= 3.0", None if a is None else a["drop"] <= 3.0),
        ("W4A4 adfq: agreement >= 98.0%", None if a is None else a["agreement"] >= 98.0),
        ("W4A4 adfq: SQNR >= minmax + 6 dB", a["sqnr_db"] >= m["sqnr_db"] + 6 if both else None),
        ("W4A4 liu2021: SQNR > minmax", None if liu is None or m is None else liu["sqnr_db"] > m["sqnr_db"]),
    ]


def _real_checks(acc: dict[str, dict], rows: dict[str, dict]) -> list[Check]:
    """Issue 14 (the real model)."""
    checks: list[Check] = []
    for recipe in ("minmax", "liu2021", "adfq"):
        r = acc.get(f"{recipe}@W8A8")
        checks.append((f"W8A8 {recipe}: drop <= 0.5 and agreement >= 98.5%",
                       None if r is None else r["drop"] <= 0.5 and r["agreement"] >= 98.5))
    r = acc.get("adfq@W6A6")
    checks.append(("W6A6 adfq: drop <= 1.5", None if r is None else r["drop"] <= 1.5))
    a, m, liu = acc.get("adfq@W4A4"), acc.get("minmax@W4A4"), acc.get("liu2021@W4A4")
    both = a is not None and m is not None
    checks += [
        ("W4A4 adfq: drop <= minmax drop / 4", a["drop"] <= m["drop"] / 4 if both else None),
        ("W4A4 adfq: SQNR >= minmax + 10 dB", a["sqnr_db"] >= m["sqnr_db"] + 10 if both else None),
        ("W4A4 liu2021: top-1 and SQNR above minmax", None if liu is None or m is None
         else liu["simulated"] > m["simulated"] and liu["sqnr_db"] > m["sqnr_db"]),
    ]
    mixed, w6 = rows.get("liu2021@mixed:6"), rows.get("liu2021@W6A6")
    checks.append(("liu2021 mixed:6: top-1 above uniform W6A6 at no larger packed size",
                   None if mixed is None or w6 is None or "liu2021@mixed:6" not in acc or "liu2021@W6A6" not in acc
                   else acc["liu2021@mixed:6"]["simulated"] > acc["liu2021@W6A6"]["simulated"]
                   and mixed["packed_size_bytes"] <= w6["packed_size_bytes"]))
    for recipe in ("liu2021", "adfq"):
        timed = [r["calibration_seconds"] for k, r in rows.items() if r["recipe"] == recipe]
        checks.append((f"{recipe}: every build's calibration <= {CALIBRATION_BUDGET_S // 60} min on this machine",
                       None if not timed else max(timed) <= CALIBRATION_BUDGET_S))
    return checks


def targets(table: dict) -> list[str]:
    """The done-when criteria of the model's issue, checked against the table's rows."""
    # A row built on an older integer arithmetic says nothing about today's programs: it counts as missing.
    rows = {r["program"]: r for r in table["rows"] if row_is_current(r)}
    acc = {k: r["accuracy"] for k, r in rows.items() if r.get("accuracy")}
    real = table["settings"]["model"] == REAL_MODEL
    checks = _real_checks(acc, rows) if real else _reference_checks(acc)
    # Our recipes' rows: the stock xnnpack-int8 row's "simulated" is PT2E's fake-quant model in torch, which
    # XNNPACK's kernels do not claim to reproduce.
    quantized = [a for k, a in acc.items() if k not in ("fp32", "xnnpack-int8")]
    checks.append(("every recipe row: .pte top-1 within 0.1 point of the simulated top-1",
                   None if not quantized else all(abs(a["pte_host"] - a["simulated"]) <= 0.1 for a in quantized)))
    lines = ["## Targets", "", "| criterion | result |", "|---|---|"]
    missing = "row missing or built on an older arithmetic" if len(rows) < len(table["rows"]) else "row missing"
    lines += [f"| {text} | {missing if met is None else ('met' if met else '**missed**')} |" for text, met in checks]
    if real:  # the rows use --eval-limit images; the full test split's float top-1 is the probe's own record
        meta = probe_meta()
        test = meta["accuracy"]
        lines += ["", f"Float model on the full {test['test_split']} split ({test['test_images']:,} images): "
                      f"top-1 {test['test_top1']:.2f}% (measured by `{meta['command']}`)."]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(PROGRAMS), default="reference")
    ap.add_argument("--split", choices=("test", "val"), default="test",
                    help="val: the bundled model's 2,000 held-out training images")
    ap.add_argument("--only", default=None, help="comma-separated programs (default: the model's full list)")
    ap.add_argument("--eval-limit", type=int, default=None, help="evaluate the first N images (balanced for "
                                                                 "the real model)")
    ap.add_argument("--devices", default="", help="also bench each program on these devices (default none)")
    ap.add_argument("--out", default=None, help="table stem (default docs/results, docs/results-val or "
                                                "docs/results-real)")
    ap.add_argument("--work", default=None, help="program folders (default build/accuracy-table/<stem name>)")
    ap.add_argument("--render", action="store_true", help="only re-render OUT.md from OUT.json")
    args = ap.parse_args()
    if args.split == "val" and args.model != "reference":
        ap.error("--split val is the bundled model's; for the real model see tools/adfq_curve.py")
    command = "python tools/accuracy_table.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    stem = Path(args.out or REPO / OUT[(args.model, args.split)])
    if args.render:
        table = read_table(stem)  # a table compare wrote, or one error line
        if table is None:
            raise VitqError(f"{stem.with_suffix('.json')} does not exist; run this without --render to build it")
        write_table(stem, table, targets)
        return
    shared = BuildOptions(target="rpi4", model=None if args.model == "reference" else args.model,
                          eval_limit=args.eval_limit or (None if args.model == "reference" else 2000))
    compare(CompareOptions(
        build=shared, programs=args.only.split(",") if args.only else PROGRAMS[args.model],
        devices=[d for d in args.devices.split(",") if d], eval_set=validation_set() if args.split == "val" else None,
        out=args.work or str(REPO / "build" / "accuracy-table" / stem.name), table=str(stem), sections=targets,
        command=command))


if __name__ == "__main__":
    run_script(main)
