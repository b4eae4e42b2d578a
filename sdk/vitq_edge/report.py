"""report.md: the manifest, for humans."""

from __future__ import annotations

from vitq_edge.artifacts import program_arithmetic_version
from vitq_edge.hostinfo import build_machine


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def render_report(m: dict) -> str:
    inp = m["input"]
    lines = [
        f"# vitq-edge build: {m['model']['name']} for {m['target']['name']}",
        "",
        f"- recipe: **{m['recipe']}** ({m['bits']})",
        f"- target: {m['target']['name']} ({m['target']['cpu']}, {m['target']['abi']})",
        f"- program: `{m['program']}`, {m['size_bytes'] / 1e6:.2f} MB, "
        f"{m['xnnpack_partitions']} XNNPACK partition(s)",
        f"- ops outside XNNPACK: {', '.join(m['non_delegated_ops']) or 'none'}",
        f"- arithmetic left in float: {', '.join(m['float_ops']) or 'none'}",
        f"- custom ops: {', '.join(m['custom_ops']) or 'none'}"
        + (f" ({m['kernels']['library']} {m['kernels']['version']})" if m.get("kernels") else ""),
        *([f"- quantized arithmetic: {m['quantization']['program_arithmetic']} (integer arithmetic version "
            f"{program_arithmetic_version(m)})"] if m.get("quantization") else []),
        f"- ExecuTorch {m['executorch_version']}, torch {m['torch_version']}, vitq-edge {m['vitq_edge_version']}",
        f"- model checkpoint: {m['model']['checkpoint']} (sha256 {m['model']['checkpoint_sha256']})",
    ]
    lines += [f"- note: {n}" for n in m["model"]["notes"]]
    lines += [
        "",
        "## Input",
        "",
        f"shape {inp['shape']} {inp['dtype']}; resize shorter side to {inp['resize_shorter_side']} "
        f"({inp['interpolation']}), center crop {inp['center_crop']}, mean {inp['mean']}, std {inp['std']}",
        "",
        "## Accuracy",
        "",
    ]
    acc = m["accuracy"]
    if acc is None:
        lines.append("not measured (--skip-eval)")
    else:
        lines += [
            f"On {acc['eval_images']} images of {acc['eval_set']}:",
            "",
            _row("model", "top-1 %", "top-5 %"),
            _row("---", "---", "---"),
            _row("fp32 (PyTorch)", acc["fp32"], acc["top5"]["fp32"]),
            _row(f"{m['recipe']} simulated (PyTorch)", acc["simulated"], acc["top5"]["simulated"]),
            _row(".pte on host (ExecuTorch runtime)", acc["pte_host"], acc["top5"]["pte_host"]),
            "",
            f"The .pte's top-1 equals the simulation's on {acc['pte_agrees_with_simulated']}% of images.",
        ]
    cal = m["calibration"]
    lines += [
        "",
        "## Calibration and timings",
        "",
        f"{cal['images']} images of {cal['set']}; calibration {m['timings_seconds']['calibration']} s, "
        f"export {m['timings_seconds']['export']} s, whole build {m['timings_seconds']['total']} s "
        f"on {build_machine(m['host'], m.get('torch'))}.",
        "",
        "## Command",
        "",
        f"    {m['command']}",
        "",
    ]
    return "\n".join(lines)
