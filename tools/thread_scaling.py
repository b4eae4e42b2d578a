"""Check the emulated multi-thread cost against this machine: predicted vs measured speedups.

For each program: `vitq-edge bench` on an emulated Pi at 1 thread (the exact count) and at
each of --threads (the modelled critical path, runtime/qemu_plugin/README.md), twice, for
repeatability; then on the host at 1 and 2 threads, alternating, --rounds times --runs
timed calls each (median of the round medians). The predicted 2-thread speedup is the
1-thread count over the 2-thread critical path; the measured one is the host's 1-thread
over 2-thread median latency. The issue's bars: the critical path repeats within 2%, and
the prediction lies within 15% of the measurement. Writes OUT.md and OUT.json.

    python tools/thread_scaling.py build/compare-real/programs/liu2021-W6A6 ... \\
        [--device emulated-rpi4] [--threads 2,4] [--rounds 5] [--runs 10] \\
        [--out docs/validation/thread-scaling]

Run it with nothing else on the machine: the host measurement needs both cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
from pathlib import Path

from vitq_edge.artifacts import write_atomic
from vitq_edge.bench import benchmark
from vitq_edge.errors import VitqError
from vitq_edge.lifetime import run_script
from vitq_edge.progress import set_quiet

REPEAT_TOLERANCE = 0.02  # the critical path across two runs
PREDICTION_TOLERANCE = 0.15  # predicted vs measured 2-thread speedup


def emulated_costs(program: Path, device: str, threads: list[int]) -> dict:
    one = benchmark(program, device, runs=2, threads=1, record=False)["instructions"]
    row = {"one_thread": one["per_inference"], "threads": {}}
    for n in threads:
        runs = [benchmark(program, device, runs=2, threads=n, record=False)["instructions"] for _ in range(2)]
        paths = [r["per_inference"] for r in runs]
        row["threads"][str(n)] = {
            "critical_path": paths, "work": runs[0]["work"], "serial": runs[0]["serial"],
            "pool": runs[0]["pool"], "tasks": runs[0]["tasks"], "regions": runs[0]["regions"],
            "untracked": runs[0]["untracked"], "busiest_thread_emulated": runs[0]["busiest_thread_emulated"],
            "repeat_spread": (max(paths) - min(paths)) / min(paths),
            "vs_one_thread": paths[0] / one["per_inference"],
        }
        print(f"  {device} {n} threads: critical path {paths[0] / 1e6:,.1f} M / {paths[1] / 1e6:,.1f} M "
              f"(1 thread {one['per_inference'] / 1e6:,.1f} M)", file=sys.stderr)
    return row


def host_latencies(program: Path, rounds: int, runs: int) -> dict:
    medians: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(rounds):
        for n in (1, 2):  # alternating, so a slow spell of the machine hits both
            medians[n].append(benchmark(program, "host", runs=runs, threads=n, record=False)["latency_ms"]["median"])
    one, two = statistics.median(medians[1]), statistics.median(medians[2])
    print(f"  host: {one:.1f} ms at 1 thread, {two:.1f} ms at 2", file=sys.stderr)
    return {"median_ms": {"1": one, "2": two}, "round_medians_ms": {str(k): v for k, v in medians.items()},
            "speedup": one / two}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("programs", nargs="+", help="build folders or .pte files")
    ap.add_argument("--device", default="emulated-rpi4", help="the emulated device that counts")
    ap.add_argument("--threads", default="2,4", help="thread counts to model (2 is always included)")
    ap.add_argument("--rounds", type=int, default=5, help="host rounds (each: 1 thread, then 2)")
    ap.add_argument("--runs", type=int, default=10, help="timed host calls per round and thread count")
    ap.add_argument("--out", default="docs/validation/thread-scaling", help="OUT.md and OUT.json")
    args = ap.parse_args()
    try:
        threads = sorted({2, *(int(t) for t in args.threads.split(","))})
    except ValueError:
        raise VitqError(f"--threads {args.threads}: give thread counts like 2,4") from None
    if not args.device.startswith("emulated-"):
        raise VitqError(f"--device {args.device}: counts come from an emulated device (emulated-rpi4 or -rpi5)")
    set_quiet(True)
    command = "python tools/thread_scaling.py " + shlex.join(sys.argv[1:])
    rows = []
    for program in args.programs:
        print(f"{program}:", file=sys.stderr)
        row = {"program": program, **emulated_costs(Path(program), args.device, threads)}
        row["host"] = host_latencies(Path(program), args.rounds, args.runs)
        two = row["threads"]["2"]
        row["predicted_speedup"] = row["one_thread"] / statistics.mean(two["critical_path"])
        row["prediction_error"] = row["predicted_speedup"] / row["host"]["speedup"] - 1
        rows.append(row)
    result = {"command": command, "device": args.device, "host": f"{platform.system()} {platform.machine()}, "
              f"{os.cpu_count()} cores", "repeat_tolerance": REPEAT_TOLERANCE,
              "prediction_tolerance": PREDICTION_TOLERANCE, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out.with_suffix(".json"), lambda f: f.write((json.dumps(result, indent=1) + "\n").encode()))
    write_atomic(out.with_suffix(".md"), lambda f: f.write(render(result, threads).encode()))
    print(f"wrote {out}.md and {out}.json", file=sys.stderr)
    return 0


def render(result: dict, threads: list[int]) -> str:
    lines = [
        "# Multi-thread cost on the emulated Pis, checked against this machine",
        "",
        f"Command: `{result['command']}` ({result['host']}).",
        "",
        "Counts: guest instructions per inference on "
        f"{result['device']}. 1 thread: the exact count. N threads: the modelled critical path "
        "(serial work + per parallel region the busiest of N equal threads given the region's "
        "pool tasks; the pool's waiting left out; runtime/qemu_plugin/README.md), from two runs "
        f"(bar: within {result['repeat_tolerance']:.0%} of each other). Host: median latency, "
        "1 and 2 threads alternating (the median of the rounds' medians). Predicted speedup = "
        "1-thread count / 2-thread critical path; measured = host 1-thread / 2-thread latency "
        f"(bar: within {result['prediction_tolerance']:.0%}).",
        "",
        "| program | 1 thread (M) | " + " | ".join(f"{n} threads (M), two runs | x 1 thread" for n in threads)
        + " | host 1 / 2 threads (ms) | predicted 2-thread speedup | measured | error |",
        "|---|---|" + "---|---|" * len(threads) + "---|---|---|---|",
    ]
    for r in result["rows"]:
        cells = [Path(r["program"]).name if Path(r["program"]).name != "model.pte" else r["program"],
                 f"{r['one_thread'] / 1e6:,.1f}"]
        for n in threads:
            t = r["threads"][str(n)]
            cells += [" / ".join(f"{c / 1e6:,.2f}" for c in t["critical_path"]) +
                      f" (spread {t['repeat_spread']:.2%})", f"{t['vs_one_thread']:.3f}"]
        h = r["host"]
        cells += [f"{h['median_ms']['1']:.1f} / {h['median_ms']['2']:.1f}", f"{r['predicted_speedup']:.3f}",
                  f"{h['speedup']:.3f}", f"{r['prediction_error']:+.1%}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Where the N-thread work goes (first run): work on all threads, serial part, pool instructions "
              "(left out), tasks and regions per inference.", "",
              "| program | threads | work (M) | serial (M) | pool (M) | tasks | regions | untracked |",
              "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        for n in threads:
            t = r["threads"][str(n)]
            lines.append(f"| {Path(r['program']).name} | {n} | {t['work'] / 1e6:,.1f} | {t['serial'] / 1e6:,.2f} | "
                         f"{t['pool'] / 1e6:,.2f} | {t['tasks']:,} | {t['regions']:,} | {t['untracked']:,} |")
    ok_repeat = all(t["repeat_spread"] <= result["repeat_tolerance"] for r in result["rows"]
                    for t in r["threads"].values())
    ok_predict = all(abs(r["prediction_error"]) <= result["prediction_tolerance"] for r in result["rows"])
    lines += ["", f"Repeatable within {result['repeat_tolerance']:.0%}: {'yes' if ok_repeat else 'NO'}. "
              f"Prediction within {result['prediction_tolerance']:.0%} of the host: "
              f"{'yes' if ok_predict else 'NO'}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    run_script(main)
