#!/usr/bin/env python3
"""Build the stock and the integer (vitq::) programs of each model and bench them on each device in one run.

    python tools/compare_flows.py                       # reference model + DeiT-Tiny, host + emulated Pi 4/5
    python tools/compare_flows.py --models reference --devices host,emulated-rpi4

For every model it runs `vitq-edge compare` over the recipes (`fp32`, `xnnpack-int8`, or a
paper recipe as `minmax@W8A8`): cost builds (random weights are fine for timm models,
accuracy is not measured here) benched with 1 thread on every device (tables and programs in
--work; a rerun resumes), and writes
docs/performance.{md,json} and docs/performance.png. Ratios in the table are taken
within this one run. Instruction counts (emulated devices) are the
ranking measure: emulated wall time is ~200x native and does not rank kernels.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import vitq_edge  # noqa: F401  (fixes the torchvision import before timm loads)
from vitq_edge.build_options import BuildOptions
from vitq_edge.compare import CompareOptions, compare
from vitq_edge.lifetime import run_script

REPO = Path(__file__).resolve().parents[1]
# shared/DESIGN.md, measured the same way (1 thread, Pi prefix): the figures to reproduce.
DESIGN_REFERENCE = {
    ("deit_tiny_patch16_224", "fp32", "emulated-rpi4"): 639.5e6,
    ("deit_tiny_patch16_224", "xnnpack-int8", "emulated-rpi4"): 564.0e6,
    ("deit_tiny_patch16_224", "fp32", "emulated-rpi5"): 613.5e6,
    ("deit_tiny_patch16_224", "xnnpack-int8", "emulated-rpi5"): 343.7e6,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="reference,deit_tiny_patch16_224")
    ap.add_argument("--recipes", default="fp32,xnnpack-int8,minmax@W8A8,minmax@W4A4")
    ap.add_argument("--devices", default="host,emulated-rpi4,emulated-rpi5")
    ap.add_argument("--host-runs", type=int, default=50)
    ap.add_argument("--calib-limit", type=int, default=64, help="calibration images (cost builds)")
    ap.add_argument("--work", default=str(REPO / "build" / "compare"))
    ap.add_argument("--docs", default=str(REPO / "docs"))
    args = ap.parse_args()
    command = "python tools/compare_flows.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])

    rows = []
    for model in args.models.split(","):
        # `vitq-edge compare` builds (cost builds, no accuracy) and benches; a rerun resumes. Host
        # latency takes many runs, emulated devices count instructions in their default few.
        out = Path(args.work) / model
        devices = args.devices.split(",")
        groups = {"host": ([d for d in devices if d == "host"], args.host_runs),
                  "devices": ([d for d in devices if d != "host"], None)}
        for name, (group, runs) in groups.items():
            if not group:
                continue
            shared = BuildOptions(target="rpi4", model=None if model == "reference" else model,
                                  calib_limit=args.calib_limit, skip_eval=True)
            table = compare(CompareOptions(build=shared, programs=args.recipes.split(","), devices=group, runs=runs,
                                           out=str(out), table=str(out / name), command=command))
            rows += [{"model": model, "program": r["program"], "device": b["device"], "threads": b["threads"],
                      "instructions": b["instructions"], "latency_ms_median": b["latency_ms_median"],
                      "size_bytes": r["pte_size_bytes"], "xnnpack_partitions": r["xnnpack_partitions"],
                      "custom_ops": r["custom_ops"], "command": command}
                     for r in table["rows"] for b in r["bench"].values()]

    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "performance.json").write_text(json.dumps(rows, indent=2) + "\n")
    (docs / "performance.md").write_text(_markdown(rows, command))
    _chart(rows, docs / "performance.png")


def _cost(r: dict) -> float:
    """The ranking measure: instructions on emulated devices, median latency on real ones."""
    return r["instructions"] or r["latency_ms_median"]


def _ratio(r: dict, base: dict | None) -> str:
    if base is None or r is base:
        return "–"
    return f"{_cost(r) / _cost(base):.3f}"


# The targets for our W8A8 / W4A4 programs on DeiT-Tiny: (program, device, baseline, at most).
TARGETS = [
    ("minmax@W8A8", "emulated-rpi4", "fp32", 0.60),
    ("minmax@W8A8", "emulated-rpi4", "xnnpack-int8", 0.70),
    ("minmax@W8A8", "emulated-rpi5", "xnnpack-int8", 0.60),
    ("minmax@W8A8", "host", "xnnpack-int8", 0.80),
]


def _targets(rows: list[dict]) -> list[str]:
    by = {(r["model"], r["program"], r["device"]): r for r in rows}
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows if r["model"].startswith("deit_tiny")):
        for program, device, baseline, limit in TARGETS:
            r, b = by.get((model, program, device)), by.get((model, baseline, device))
            if r and b:
                ratio = _cost(r) / _cost(b)
                lines.append(f"- {model} {program} on {device}: {ratio:.3f} x {baseline} "
                             f"(target <= {limit:.2f}: {'met' if ratio <= limit else 'MISSED'})")
        w8, w4 = by.get((model, "minmax@W8A8", "host")), by.get((model, "minmax@W4A4", "host"))
        if w8 and w4:
            ratio = w4["size_bytes"] / w8["size_bytes"]
            lines.append(f"- {model} program size W4A4 / W8A8: {ratio:.3f} "
                         f"(target <= 0.60: {'met' if ratio <= 0.6 else 'MISSED'})")
    return lines


def _markdown(rows: list[dict], command: str) -> str:
    lines = [
        "# Performance: stock ExecuTorch programs and vitq-edge integer programs",
        "",
        "Written by `tools/compare_flows.py` (through `vitq-edge compare`; a rerun resumes, keeping",
        "finished builds and benches):",
        "",
        f"    {command}",
        "",
        "1 thread. `instructions` = guest instructions per inference counted by our qemu plugin",
        "(emulated Pi 4 = Cortex-A72, Pi 5 = Cortex-A76, with the boards' CPU description so",
        "XNNPACK picks their kernels); exact and repeatable. Emulated latency is qemu wall time",
        "(~200x the board's) and is shown only for completeness. Host = this 2-core x86-64 machine.",
        "`minmax@W8A8` / `@W4A4` are our programs: the paper recipes' quantized model lowered",
        "through the vitq:: integer kernels (libvitq_kernels.so) next to XNNPACK. Ratios compare",
        "instructions on emulated devices and median latency on the host.",
        "",
        "| model | program | device | instructions (M) | vs fp32 | vs int8 | DESIGN.md (M) "
        "| median latency (ms) | size (MB) | partitions |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {(r["model"], r["program"], r["device"]): r for r in rows if r["program"] in ("fp32", "xnnpack-int8")}
    for r in rows:
        ins = r["instructions"]
        ref = DESIGN_REFERENCE.get((r["model"], r["program"], r["device"]))
        cells = [r["model"], r["program"], r["device"], f"{ins / 1e6:.1f}" if ins else "–",
                 _ratio(r, base.get((r["model"], "fp32", r["device"]))),
                 _ratio(r, base.get((r["model"], "xnnpack-int8", r["device"]))),
                 f"{ref / 1e6:.1f}" if ref else "–", f"{r['latency_ms_median']:.2f}",
                 f"{r['size_bytes'] / 1e6:.2f}", str(r["xnnpack_partitions"])]
        lines.append("| " + " | ".join(cells) + " |")
    targets = _targets(rows)
    if targets:
        lines += ["", "## Targets (DeiT-Tiny, 1 thread)", "", *targets]
    lines += ["", "![instructions per inference](performance.png)", ""]
    return "\n".join(lines)


def _short(model: str) -> str:
    return "reference" if model.startswith(("vitq_reference", "reference")) else model.replace("_patch16_224", "")


def _chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    emulated = [r for r in rows if r["instructions"]]
    host = [r for r in rows if not r["instructions"]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, subset, key, label in ((axes[0], emulated, "instructions", "M instructions / inference (emulated)"),
                                   (axes[1], host, "latency_ms_median", "median latency, ms (host)")):
        names = [f"{_short(r['model'])}\n{r['program']}\n{r['device'].replace('emulated-', 'emu-')}"
                 for r in subset]
        values = [r[key] / (1e6 if key == "instructions" else 1) for r in subset]
        palette = {"fp32": "#4c72b0", "xnnpack-int8": "#dd8452"}
        colors = [palette.get(r["program"], "#55a868") for r in subset]
        ax.bar(range(len(values)), values, color=colors)
        ax.set_xticks(range(len(values)), names, fontsize=7)
        ax.set_ylabel(label)
        ax.set_yscale("log")
    fig.suptitle("1 thread: blue stock fp32, orange stock xnnpack-int8, green vitq-edge integer programs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    run_script(main)
