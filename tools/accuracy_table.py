"""Accuracy of every paper recipe x bit width on the bundled reference model -> docs/results.{md,json}.

    .venv/bin/python tools/accuracy_table.py                 # full 10,000-image test set
    .venv/bin/python tools/accuracy_table.py --split val     # 2,000 held-out training images,
                                                             # for choosing options (never the test set)
    .venv/bin/python tools/accuracy_table.py --only adfq@W4A4 --out /tmp/adfq

Calibration uses the bundled 1,024 training images. Every row evaluates the simulated
quantized model (what the device computes) against the float model on the same images:
top-1, drop, agreement (share of images whose top-1 equals the float top-1) and logit SQNR
(10 log10 of float logit power over error power). Each quantized row is then lowered into
its .pte (the integer vitq:: program, as `vitq-edge build` writes it) and the .pte runs on
the same images in ExecuTorch's runtime: `pte_host` is its top-1, next to the simulation's.
Rows are written as they finish.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import vitq_edge  # noqa: F401  (torchvision shim before timm)
from vitq_edge.data.datasets import ImageSet, bundled_set
from vitq_edge.data.fashion_mnist import load_split
from vitq_edge.device.host_runtime import HostProgram
from vitq_edge.lower.export import lower_to_executorch
from vitq_edge.models.reference import load_reference_meta, reference_assets
from vitq_edge.models.source import load_model
from vitq_edge.progress import progress
from vitq_edge.quant import quantize, recipe_config

ROWS = [("fp32", "fp32")] + [(r, b) for r in ("minmax", "liu2021", "adfq") for b in ("W8A8", "W6A6", "W4A4")] + [
    ("liu2021", "mixed:6"), ("liu2021", "mixed:8")]
VAL_IMAGES = 2000


def validation_set() -> ImageSet:
    """2,000 training images that are not calibration images (seeded); the model saw them in training."""
    images, labels = load_split("train")
    with np.load(reference_assets().calib) as z:
        calib_idx = set(z["source_indices"].tolist())
    rest = np.array([i for i in range(len(labels)) if i not in calib_idx])
    pick = np.sort(np.random.default_rng(1).choice(rest, VAL_IMAGES, replace=False))
    return ImageSet("fmnist-train-validation", load_reference_meta()["labels"], labels[pick].astype(np.int64),
                    _arrays=images[pick])


def host_description() -> str:
    return f"{os.cpu_count()} CPU cores, torch {torch.__version__}"


def float_size_bytes(model: torch.nn.Module) -> int:
    return 4 * sum(p.numel() for p in model.parameters())


def evaluate(module: Callable[[torch.Tensor], torch.Tensor], inputs: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([module(x) for x in inputs])


def pte_metrics(qmodule: torch.nn.Module, example: torch.Tensor, inputs: list[torch.Tensor],
                labels: torch.Tensor, sim_logits: torch.Tensor) -> dict:
    """The lowered program's top-1 on the same images, and how often it agrees with the simulation."""
    lowered = lower_to_executorch(qmodule, (example,), integer=True)
    program = HostProgram(lowered.buffer)
    logits = evaluate(program, inputs)
    return {"pte_host": round(100.0 * float((logits.argmax(1) == labels).float().mean()), 2),
            "pte_agrees_with_simulated": round(100.0 * float((logits.argmax(1) == sim_logits.argmax(1))
                                                             .float().mean()), 2),
            "pte_arithmetic": lowered.arithmetic, "pte_size_bytes": len(lowered.buffer)}


def row_metrics(logits: torch.Tensor, fp_logits: torch.Tensor, labels: torch.Tensor, fp_top1: float) -> dict:
    top1 = 100.0 * float((logits.argmax(1) == labels).float().mean())
    agree = 100.0 * float((logits.argmax(1) == fp_logits.argmax(1)).float().mean())
    err = float((logits - fp_logits).pow(2).sum())
    sqnr = float("inf") if err == 0 else 10 * np.log10(float(fp_logits.pow(2).sum()) / err)
    return {"top1": round(top1, 2), "drop": round(fp_top1 - top1, 2), "agreement": round(agree, 2),
            "sqnr_db": round(sqnr, 2) if np.isfinite(sqnr) else None}


def write_outputs(out: Path, rows: list[dict], meta: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rows, indent=2) + "\n")
    os.replace(tmp, out.with_suffix(".json"))
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text(render_markdown(rows, meta))
    os.replace(tmp, out.with_suffix(".md"))


def render_markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Accuracy of the quantization recipes on the bundled reference model",
        "",
        f"Model: {meta['model']} (timm ViT, Fashion-MNIST 28x28, 6 blocks, width 192). "
        f"Evaluated on {meta['eval_set']} ({meta['eval_images']} images); calibration on the bundled "
        "1,024 training images. Generated by (each row's `table_command` in results.json says which):",
        "",
        *[f"    {c}" for c in dict.fromkeys(r.get("table_command", meta["command"]) for r in rows)],
        "",
        f"on {meta['host']}, {meta['date']}. Every quantized row is the simulated quantized model "
        "(`vitq_edge.quant`): what the device computes, with LayerNorm, softmax, GELU and residual adds in float. "
        "Size = weights packed at their bit width + float32 for everything else. Agreement = share of images whose "
        "top-1 equals the FP32 model's; SQNR = 10 log10(FP32 logit power / logit error power).",
        "",
        "`pte_host` = top-1 of the row's .pte (the integer vitq:: program unless the row says otherwise) run in "
        "ExecuTorch's runtime on this machine; `.pte KB` = its file size.",
        "",
        "| recipe | bits | top-1 % | pte_host % | drop | agreement % | SQNR dB | size KB | .pte KB | calib s | notes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        sq = "—" if r["sqnr_db"] is None else f"{r['sqnr_db']:.2f}"
        pte = "—" if r.get("pte_host") is None else f"{r['pte_host']:.2f}"
        pte_kb = "—" if r.get("pte_size_bytes") is None else f"{r['pte_size_bytes'] / 1024:.0f}"
        notes = r.get("notes", "")
        if r.get("pte_arithmetic", "integer") != "integer":
            notes = "; ".join(filter(None, [notes, f".pte {r['pte_arithmetic']}"]))
        lines.append(f"| {r['recipe']} | {r['bits']} | {r['top1']:.2f} | {pte} | {r['drop']:+.2f} | "
                     f"{r['agreement']:.2f} | {sq} | {r['size_bytes'] / 1024:.0f} | {pte_kb} | "
                     f"{r['calib_seconds']:.0f} | {notes} |")
    lines += ["", *targets_section(rows)]
    lines += ["", "Row commands (each row's `command` in results.json builds the same model as a .pte):", ""]
    lines += [f"- `{r['command']}`" for r in rows]
    return "\n".join(lines) + "\n"


def targets_section(rows: list[dict]) -> list[str]:
    """The issue's done-when criteria, checked against these rows (a row that is missing says so)."""
    by = {(r["recipe"], r["bits"]): r for r in rows}
    checks: list[tuple[str, bool | None]] = []

    def get(recipe: str, bits: str) -> dict | None:
        return by.get((recipe, bits))

    for recipe in ("minmax", "liu2021", "adfq"):
        r = get(recipe, "W8A8")
        checks.append((f"W8A8 {recipe}: drop <= 0.5 and agreement >= 99.5%",
                       None if r is None else r["drop"] <= 0.5 and r["agreement"] >= 99.5))
    for recipe in ("liu2021", "adfq"):
        r = get(recipe, "W6A6")
        checks.append((f"W6A6 {recipe}: drop <= 1.0", None if r is None else r["drop"] <= 1.0))
    a, m, liu = get("adfq", "W4A4"), get("minmax", "W4A4"), get("liu2021", "W4A4")
    ok = a is not None and m is not None
    checks += [
        ("W4A4 adfq: drop <= minmax drop / 3", ok and a["drop"] <= m["drop"] / 3 if ok else None),
        ("W4A4 adfq: drop <= 3.0", None if a is None else a["drop"] <= 3.0),
        ("W4A4 adfq: agreement >= 98.0%", None if a is None else a["agreement"] >= 98.0),
        ("W4A4 adfq: SQNR >= minmax + 6 dB", ok and a["sqnr_db"] >= m["sqnr_db"] + 6 if ok else None),
        ("W4A4 liu2021: SQNR > minmax", None if liu is None or m is None else liu["sqnr_db"] > m["sqnr_db"]),
    ]
    quantized = [r for r in rows if r["recipe"] != "fp32"]
    checks.append(("every quantized row: pte_host within 0.1 point of the simulated top-1",
                   None if not quantized or any(r.get("pte_host") is None for r in quantized)
                   else all(abs(r["pte_host"] - r["top1"]) <= 0.1 for r in quantized)))
    lines = ["## Targets", "", "| criterion | result |", "|---|---|"]
    lines += [f"| {text} | {'row missing' if res is None else ('met' if res else '**missed**')} |"
              for text, res in checks]
    return lines


def notes_for(details: dict) -> str:
    notes = []
    mp = details.get("mixed_precision")
    if mp:
        bits = sorted(mp["bits"].items())
        notes.append("bits " + " ".join(f"{m.replace('blocks.', 'b').replace('.', '')}={b}" for m, b in bits))
    outliers = details.get("outlier_fraction")
    if outliers:
        notes.append(f"PPOQ outliers kept: max {max(outliers.values()) * 100:.4f}% of values")
    return "; ".join(notes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", choices=("test", "val"), default="test")
    ap.add_argument("--only", default=None, help="comma-separated recipe@bits rows (fp32 always runs)")
    ap.add_argument("--out", default=None, help="output stem (default docs/results, or docs/results-val)")
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    ap.add_argument("--render", action="store_true", help="only re-render the .md from the existing .json")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of the existing output that this run does not recompute")
    args = ap.parse_args()
    command = "python tools/accuracy_table.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    out = Path(args.out or ("docs/results" if args.split == "test" else "docs/results-val"))
    if args.render:
        rows = json.loads(out.with_suffix(".json").read_text())
        eval_set = "bundled-fmnist-test" if args.split == "test" else "fmnist-train-validation"
        write_outputs(out, rows, {"model": rows[0]["model"], "eval_images": rows[0]["eval_images"],
                                  "eval_set": eval_set, "command": command, "host": host_description(),
                                  "date": datetime.date.today().isoformat()})
        return

    loaded = load_model(None)
    model, pre = loaded.model, loaded.preprocess
    calib = torch.cat([x for x, _ in bundled_set("calib").batches(pre, 256)])
    data = (bundled_set("eval") if args.split == "test" else validation_set()).limit(args.limit)
    pairs = list(data.batches(pre, 500))
    inputs = [x for x, _ in pairs]
    labels = torch.cat([y for _, y in pairs])
    fp_logits = evaluate(model, inputs)
    fp_top1 = 100.0 * float((fp_logits.argmax(1) == labels).float().mean())

    wanted = ROWS if args.only is None else [("fp32", "fp32")] + [tuple(s.split("@")) for s in args.only.split(",")]
    meta = {"model": loaded.name, "eval_set": data.name, "eval_images": len(data), "command": command,
            "host": host_description(),
            "date": datetime.date.today().isoformat()}
    kept: dict[tuple[str, str], dict] = {}
    if args.merge and out.with_suffix(".json").is_file():
        kept = {(r["recipe"], r["bits"]): r for r in json.loads(out.with_suffix(".json").read_text())}
    computed: dict[tuple[str, str], dict] = {}

    def ordered() -> list[dict]:
        rows = {**kept, **computed}
        order = ROWS + [k for k in rows if k not in ROWS]
        return [rows[k] for k in order if k in rows]

    for recipe, bits in progress(wanted, "accuracy table", unit="row"):
        if recipe == "fp32":
            module, seconds, size, details = model, 0.0, float_size_bytes(model), {}
        else:
            t0 = time.time()
            qm = quantize(model, recipe_config(recipe, bits), [calib], (calib[:1],))
            seconds, module, size, details = time.time() - t0, qm.module, qm.size_bytes, qm.details
        logits = evaluate(module, inputs)
        metrics = row_metrics(logits, fp_logits, labels, fp_top1)
        if recipe != "fp32":
            metrics.update(pte_metrics(module, calib[:1], inputs, labels, logits))
        computed[(recipe, bits)] = {
            "model": loaded.name, "recipe": recipe, "bits": bits, **metrics, "size_bytes": size,
            "calib_seconds": round(seconds, 1), "eval_images": len(data),
            "command": f"vitq-edge build --target rpi4 --recipe {recipe}"
                       + ("" if recipe == "fp32" else f" --bits {bits}"),
            "table_command": command, "notes": notes_for(details)}
        write_outputs(out, ordered(), meta)
        print(json.dumps(computed[(recipe, bits)]), flush=True)


if __name__ == "__main__":
    main()
