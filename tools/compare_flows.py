#!/usr/bin/env python3
"""Build the stock and the integer (vitq::) programs of each model and bench them on each device in one run.

    python tools/compare_flows.py --rebench      # the three models, host + emulated Pi 4/5, 1 and 4 threads
    python tools/compare_flows.py --models reference --devices host,emulated-rpi4 --threads 1

For every model it runs `vitq-edge compare` over its programs (`fp32`, `xnnpack-int8`, or a
paper recipe as `minmax@W8A8`) and benches each on every device at every thread count, then
writes docs/performance.{md,json} and docs/performance.png. The bundled reference and
DeiT-Tiny are cost builds (random weights where there is no checkpoint, accuracy not
measured; programs in --work/<model>, their tables in --work/tables). The real pretrained ViT (dinov2-s14-cifar10) is
benched on the programs of its accuracy table, docs/results-real (same settings, same
folder), so its costs are those of the programs whose accuracy that table reports; a
missing program is built there as that table builds it (the adfq rows take about an hour
each). A rerun resumes; --rebench measures every bench again (after a runtime rebuild:
ratios are only taken between numbers of one run). Instruction counts (emulated devices)
are the ranking measure: emulated wall time is ~200x native and does not rank kernels. At
N > 1 threads an emulated count is the modelled critical path (runtime/qemu_plugin/README.md).
The host runs at most as many threads as it has cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import vitq_edge  # noqa: F401  (fixes the torchvision import before timm loads)
from vitq_edge.build_options import BuildOptions
from vitq_edge.compare import CompareOptions, compare
from vitq_edge.errors import VitqError
from vitq_edge.lifetime import run_script

REPO = Path(__file__).resolve().parents[1]
# shared/DESIGN.md, measured the same way (1 thread, Pi prefix): the figures to reproduce.
DESIGN_REFERENCE = {
    ("deit_tiny_patch16_224", "fp32", "emulated-rpi4"): 639.5e6,
    ("deit_tiny_patch16_224", "xnnpack-int8", "emulated-rpi4"): 564.0e6,
    ("deit_tiny_patch16_224", "fp32", "emulated-rpi5"): 613.5e6,
    ("deit_tiny_patch16_224", "xnnpack-int8", "emulated-rpi5"): 343.7e6,
}
REAL_MODEL = "dinov2-s14-cifar10"
STOCK = ("fp32", "xnnpack-int8")


@dataclass(frozen=True)
class ModelRun:
    """One model's programs and where they live."""

    programs: str
    out: str | None = None  # default: --work/<model>, one table per device group
    table: str | None = None  # the real model: its accuracy table (which also gets the benches)
    eval_limit: int | None = None  # the accuracy table's evaluation images (None: a cost build)


MODELS = {
    "reference": ModelRun("fp32,xnnpack-int8,minmax@W8A8,minmax@W4A4"),
    "deit_tiny_patch16_224": ModelRun("fp32,xnnpack-int8,minmax@W8A8,minmax@W4A4"),
    # adfq: the recipe whose programs keep the most accuracy on this model at every width (docs/results-real).
    REAL_MODEL: ModelRun("fp32,xnnpack-int8,adfq@W8A8,adfq@W4A4", out="build/compare-real",
                         table="docs/results-real", eval_limit=2000),
}

# The targets: (model, program, device, threads, baseline, at most). Baseline "1 thread": the
# program's own 1-thread count.
TARGETS = [
    ("deit_tiny_patch16_224", "minmax@W8A8", "emulated-rpi4", 1, "fp32", 0.50),
    ("deit_tiny_patch16_224", "minmax@W8A8", "emulated-rpi5", 1, "xnnpack-int8", 0.45),
    ("deit_tiny_patch16_224", "minmax@W8A8", "host", 1, "xnnpack-int8", 0.50),
    ("deit_tiny_patch16_224", "minmax@W8A8", "emulated-rpi4", 4, "1 thread", 0.30),
    ("deit_tiny_patch16_224", "minmax@W8A8", "emulated-rpi4", 4, "xnnpack-int8", 0.70),
    (REAL_MODEL, "adfq@W8A8", "emulated-rpi4", 1, "fp32", 0.60),
    (REAL_MODEL, "adfq@W8A8", "emulated-rpi5", 1, "xnnpack-int8", 0.60),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"any of {', '.join(MODELS)}")
    ap.add_argument("--devices", default="host,emulated-rpi4,emulated-rpi5")
    ap.add_argument("--threads", default="1,4", help="thread counts (the host: at most its cores)")
    ap.add_argument("--host-runs", type=int, default=50)
    ap.add_argument("--emulated-runs", type=int, default=1, help="counts are exact: one timed run after warmup")
    ap.add_argument("--calib-limit", type=int, default=64, help="calibration images (cost builds)")
    ap.add_argument("--rebench", action="store_true", help="bench every program again (see above)")
    ap.add_argument("--work", default=str(REPO / "build" / "compare"))
    ap.add_argument("--docs", default=str(REPO / "docs"))
    args = ap.parse_args()
    command = "python tools/compare_flows.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        raise VitqError(f"unknown model {unknown[0]}; choose from {', '.join(MODELS)}")
    try:
        threads = [int(t) for t in args.threads.split(",")]
    except ValueError:
        raise VitqError(f"--threads {args.threads}: give thread counts, e.g. 1,4") from None
    cores = os.cpu_count() or 1
    host_threads = sorted({min(t, cores) for t in threads})

    rows = []
    for model in args.models.split(","):
        spec = MODELS[model]
        out = Path(spec.out) if spec.out else Path(args.work) / model
        devices = args.devices.split(",")
        # Host latency takes many runs; emulated devices count instructions exactly in one.
        groups = [([d for d in devices if d == "host"], host_threads, args.host_runs),
                  ([d for d in devices if d != "host"], threads, args.emulated_runs)]
        for group, group_threads, runs in groups:
            if not group:
                continue
            # One table per model for both groups: the second group finds the first's programs and benches
            # them, instead of building them again.
            shared = BuildOptions(target="rpi4", model=None if model == "reference" else model,
                                  calib_limit=None if spec.table else args.calib_limit,
                                  eval_limit=spec.eval_limit, skip_eval=spec.table is None)
            table = compare(CompareOptions(build=shared, programs=spec.programs.split(","), devices=group,
                                           threads=group_threads, runs=runs, rebench=args.rebench, out=str(out),
                                           table=spec.table or str(Path(args.work) / "tables" / model),
                                           command=command))
            wanted = set(spec.programs.split(","))
            rows += [{"model": model, "program": r["program"], "device": b["device"], "threads": b["threads"],
                      "instructions": b["instructions"], "latency_ms_median": b["latency_ms_median"],
                      "size_bytes": r["pte_size_bytes"], "xnnpack_partitions": r["xnnpack_partitions"],
                      "custom_ops": r["custom_ops"], "top1_pte": (r.get("accuracy") or {}).get("pte_host"),
                      "outlier_fraction_max": r.get("outlier_fraction_max"), "measured": b.get("measured"),
                      "gemm": b.get("gemm"),
                      "command": command}
                     for r in table["rows"] if r["program"] in wanted
                     for b in r.get("bench", {}).values() if b["device"] in group and b["threads"] in group_threads]

    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    rows = _other_models_rows(docs / "performance.json", set(args.models.split(","))) + rows
    (docs / "performance.json").write_text(json.dumps(rows, indent=2) + "\n")
    (docs / "performance.md").write_text(_markdown(rows))
    _chart(rows, docs / "performance.png")


def _other_models_rows(path: Path, rerun: set[str]) -> list[dict]:
    """The rows of an earlier run's performance.json for the models this run left out (--models): a run
    of one model rewrites its rows and keeps the others'. Each row names the command that measured it."""
    if not path.is_file():
        return []
    try:
        earlier = json.loads(path.read_text())
    except ValueError:
        raise VitqError(f"{path} is not JSON; move it away and rerun with every model") from None
    return [r for r in earlier if r.get("model") not in rerun]


def _cost(r: dict) -> float:
    """The ranking measure: instructions on emulated devices, median latency on real ones."""
    return r["instructions"] or r["latency_ms_median"]


def _index(rows: list[dict]) -> dict:
    return {(r["model"], r["program"], r["device"], r["threads"]): r for r in rows}


def _ratio(r: dict, base: dict | None) -> str:
    if base is None or r is base:
        return "–"
    return f"{_cost(r) / _cost(base):.3f}"


def _targets(rows: list[dict]) -> list[str]:
    by = _index(rows)
    lines = []
    for model, program, device, threads, baseline, limit in TARGETS:
        r = by.get((model, program, device, threads))
        b = by.get((model, program, device, 1) if baseline == "1 thread" else (model, baseline, device, threads))
        if r and b:
            ratio = _cost(r) / _cost(b)
            lines.append(f"- {model} {program} on {device}, {threads} thread{'s' if threads > 1 else ''}: "
                         f"{ratio:.3f} x {baseline if baseline == '1 thread' else baseline + ' (same threads)'} "
                         f"(target <= {limit:.2f}: {'met' if ratio <= limit else 'MISSED'})")
    for model in dict.fromkeys(r["model"] for r in rows if r["model"].startswith("deit_tiny")):
        w8, w4 = by.get((model, "minmax@W8A8", "host", 1)), by.get((model, "minmax@W4A4", "host", 1))
        if w8 and w4:
            ratio = w4["size_bytes"] / w8["size_bytes"]
            lines.append(f"- {model} program size W4A4 / W8A8: {ratio:.3f} "
                         f"(target <= 0.60: {'met' if ratio <= 0.6 else 'MISSED'})")
    return lines


def _markdown(rows: list[dict]) -> str:
    commands = list(dict.fromkeys(r["command"] for r in rows))
    lines = [
        "# Performance: stock ExecuTorch programs and vitq-edge integer programs",
        "",
        "Written by `tools/compare_flows.py` (through `vitq-edge compare`; a rerun resumes, keeping",
        "finished builds; `--rebench` measures every bench again; a run of some `--models` keeps the",
        "other models' rows). The runs whose rows are below:",
        "",
        *[f"    {c}" for c in commands],
        "",
        "`instructions` = guest instructions per inference counted by our qemu plugin (emulated",
        "Pi 4 = Cortex-A72, Pi 5 = Cortex-A76, with the boards' CPU description so XNNPACK picks",
        "their kernels): at 1 thread the exact count, at N threads the modelled critical path of N",
        "threads (serial work + per parallel region the busiest of N equal threads;",
        "runtime/qemu_plugin/README.md). Both repeat exactly. Emulated latency is qemu wall time",
        "(~200x the board's) and is shown only for completeness. Host = this x86-64 machine, which",
        "has 2 cores: its rows run 1 and 2 threads, median of the timed runs. Ratios compare",
        "instructions on emulated devices and median latency on the host, at the same thread",
        "count; `x 1 thread` is the program's own 1-thread cost. `minmax@...` / `adfq@...` are our",
        "programs: the recipe's quantized model lowered through the vitq:: integer kernels",
        "(libvitq_kernels.so) next to XNNPACK. DeiT-Tiny and the reference are cost builds (random",
        "DeiT weights); dinov2-s14-cifar10 is the real pretrained ViT-S/14 at 224 px with the",
        "programs of docs/results-real.md (`top-1` = its .pte on that table's 2,000 test images;",
        "`outliers` = the largest share of an input's calibration values PPOQ keeps in float;",
        "`int8 GEMM` = the one our kernels ran, as the runner reports it: runtime/README.md).",
        "",
        "| model | program | device | threads | instructions (M) | vs fp32 | vs int8 | x 1 thread "
        "| DESIGN.md (M) | median latency (ms) | size (MB) | top-1 | outliers | int8 GEMM |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by = _index(rows)
    for r in sorted(rows, key=lambda r: (list(MODELS).index(r["model"]) if r["model"] in MODELS else 99,
                                         r["device"], r["threads"])):
        key = (r["model"], r["program"], r["device"])
        ins = r["instructions"]
        ref = DESIGN_REFERENCE.get(key) if r["threads"] == 1 else None
        top1, outliers = r.get("top1_pte"), r.get("outlier_fraction_max")
        cells = [r["model"], r["program"], r["device"], str(r["threads"]), f"{ins / 1e6:,.1f}" if ins else "–",
                 _ratio(r, by.get((r["model"], "fp32", r["device"], r["threads"]))),
                 _ratio(r, by.get((r["model"], "xnnpack-int8", r["device"], r["threads"]))),
                 _ratio(r, by.get((*key, 1))),
                 f"{ref / 1e6:.1f}" if ref else "–", f"{r['latency_ms_median']:.2f}",
                 f"{r['size_bytes'] / 1e6:.2f}", f"{top1:.2f}%" if top1 is not None else "–",
                 f"{100 * outliers:.2f}%" if outliers else "–", r.get("gemm") or "–"]
        lines.append("| " + " | ".join(cells) + " |")
    targets = _targets(rows)
    if targets:
        lines += ["", "## Targets", "", *targets]
    lines += ["", "Per op, with the real model's outlier correction: docs/op_costs.md (tools/op_costs.py).",
              "", "![instructions per inference](performance.png)", ""]
    return "\n".join(lines)


def _short(model: str) -> str:
    return "reference" if model.startswith(("vitq_reference", "reference")) else model.replace("_patch16_224", "")


def _chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(len(models), 2, figsize=(14, 3.6 * len(models)), squeeze=False)
    palette = {"fp32": "#4c72b0", "xnnpack-int8": "#dd8452"}
    for row_axes, model in zip(axes, models, strict=True):
        mine = [r for r in rows if r["model"] == model]
        emulated = [r for r in mine if r["instructions"]]
        host = [r for r in mine if not r["instructions"]]
        for ax, subset, key, label in ((row_axes[0], emulated, "instructions", "M instructions / inference"),
                                       (row_axes[1], host, "latency_ms_median", "median latency, ms (host)")):
            subset = sorted(subset, key=lambda r: (r["device"], r["threads"]))
            names = [f"{r['program']}\n{r['device'].replace('emulated-', 'emu-')}@{r['threads']}" for r in subset]
            values = [r[key] / (1e6 if key == "instructions" else 1) for r in subset]
            colors = [palette.get(r["program"], "#55a868") for r in subset]
            ax.bar(range(len(values)), values, color=colors)
            ax.set_xticks(range(len(values)), names, fontsize=6, rotation=90)
            ax.set_ylabel(label, fontsize=8)
            ax.set_yscale("log")
            ax.set_title(_short(model), fontsize=9)
    fig.suptitle("blue stock fp32, orange stock xnnpack-int8, green vitq-edge integer programs; "
                 "device@threads (emulated at N threads: modelled critical path)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    run_script(main)
