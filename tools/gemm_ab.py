"""Host latency of programs under two or more of the kernels' GEMM choices, measured in one run.

    python tools/gemm_ab.py build/compare-real/programs/adfq-W6A6 ... \\
        [--choices default,xnnpack] [--rounds 5] [--runs 10] [--out docs/validation/gemm-ab-host]

A choice is a value of VITQ_GEMM for the runner (`default`: unset, the CPU's own choice;
`xnnpack`: XNNPACK's GEMM for the linear layers, int16 attention codes and log_linear's
per-code sums, the path of x86 CPUs without VNNI; runtime/README.md). Every choice computes the
same bits, so only time differs. Per round each program runs under each choice in turn
(`vitq-edge bench --device host`, --runs timed calls), so a slow spell of the machine hits all
of them; the figure is the median of the rounds' medians. Writes OUT.md and OUT.json.

Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
from pathlib import Path

from vitq_edge.artifacts import write_atomic
from vitq_edge.bench import benchmark
from vitq_edge.errors import VitqError
from vitq_edge.hostinfo import cpu_model
from vitq_edge.lifetime import run_script
from vitq_edge.progress import set_quiet

CHOICES = ("default", "xnnpack", "pairs", "dot")


def bench(program: Path, choice: str, runs: int, threads: int) -> dict:
    """One host bench with VITQ_GEMM set to `choice` (the runner inherits the environment)."""
    saved = os.environ.pop("VITQ_GEMM", None)
    try:
        if choice != "default":
            os.environ["VITQ_GEMM"] = choice
        return benchmark(program, "host", runs=runs, threads=threads, record=False)
    finally:
        os.environ.pop("VITQ_GEMM", None)
        if saved is not None:
            os.environ["VITQ_GEMM"] = saved


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("programs", nargs="+", help="build folders or .pte files")
    ap.add_argument("--choices", default="default,xnnpack", help=f"VITQ_GEMM values: any of {', '.join(CHOICES)}")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=10, help="timed calls per bench")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="docs/validation/gemm-ab-host", help="OUT.md and OUT.json")
    args = ap.parse_args()
    choices = args.choices.split(",")
    unknown = [c for c in choices if c not in CHOICES]
    if unknown or len(choices) < 2:
        raise VitqError(f"--choices {args.choices}: give two or more of {', '.join(CHOICES)}")
    if args.rounds < 1 or args.runs < 1:
        raise VitqError("--rounds and --runs must be at least 1")
    set_quiet(True)
    command = "python tools/gemm_ab.py " + shlex.join(sys.argv[1:])
    rows = []
    for program in args.programs:
        medians: dict[str, list[float]] = {c: [] for c in choices}
        gemm: dict[str, str | None] = {}  # what the runner says its kernels ran (None: no vitq:: ops)
        for r in range(args.rounds):
            for c in choices:
                result = bench(Path(program), c, args.runs, args.threads)
                medians[c].append(result["latency_ms"]["median"])
                gemm[c] = result["kernels_gemm"]
            print(f"{program} round {r + 1}/{args.rounds}: "
                  + ", ".join(f"{c} {medians[c][-1]:.2f} ms" for c in choices), file=sys.stderr)
        rows.append({"program": program, "median_ms": {c: statistics.median(v) for c, v in medians.items()},
                     "round_medians_ms": medians, "gemm": gemm})
    result = {"command": command, "cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads,
              "rounds": args.rounds, "runs": args.runs, "choices": choices, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out.with_suffix(".json"), lambda f: f.write((json.dumps(result, indent=1) + "\n").encode()))
    write_atomic(out.with_suffix(".md"), lambda f: f.write(render(result).encode()))
    print(f"wrote {out}.md and {out}.json", file=sys.stderr)
    return 0


def render(result: dict) -> str:
    first, choices = result["choices"][0], result["choices"]
    lines = [
        "# Host latency under the kernels' GEMM choices",
        "",
        f"Command: `{result['command']}`.",
        "",
        f"CPU: {result['cpu']} ({result['cores']} cores); {result['threads']} runner thread(s). Median latency "
        f"of one inference in ms: per round each program under each choice (VITQ_GEMM; `default` = unset) in "
        f"turn, {result['runs']} timed calls each; the median of {result['rounds']} rounds' medians. Every "
        "choice computes the same bits (runtime/README.md).",
        "",
        "Each cell names the GEMM the runner reported its kernels ran (`none`: the program has no vitq:: ops).",
        "",
        "| program | " + " | ".join(f"{c} (ms)" for c in choices) + " | "
        + " | ".join(f"{c} / {first}" for c in choices[1:]) + " |",
        "|---|" + "---|" * (2 * len(choices) - 1),
    ]
    for r in result["rows"]:
        m, g = r["median_ms"], r["gemm"]
        lines.append(f"| {r['program']} | " + " | ".join(f"{m[c]:.2f} ({g[c] or 'none'})" for c in choices) + " | "
                     + " | ".join(f"{m[c] / m[first]:.2f}x" for c in choices[1:]) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_script(main)
