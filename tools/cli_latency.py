"""How fast `vitq-edge` answers when it does no work: --help, `targets`, and usage errors.

Each command runs --runs times as a fresh process (the console script, as from a shell);
the table holds the median and the slowest wall time, and what the command printed on
stderr (one `error:` line for the usage errors). Writes docs/cli-latency.md.

    python tools/cli_latency.py [--runs 7] [--program build/rpi4] [--out docs/cli-latency.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 1.5  # the architecture issue's bar for help and usage errors

# (what, arguments, expected exit code)
COMMANDS = [
    ("help", ["--help"], 0),
    ("build help", ["build", "--help"], 0),
    ("targets", ["targets"], 0),
    ("unknown recipe", ["build", "--recipe", "magic"], 2),
    ("bad bits", ["build", "--recipe", "adfq", "--bits", "W3A3"], 2),
    ("unknown --option", ["build", "--recipe", "liu2021", "--option", "nope=1"], 2),
    ("missing --calib folder", ["build", "--calib", "MISSING"], 2),
    ("missing --checkpoint", ["build", "--checkpoint", "MISSING/weights.pt"], 2),
    ("unknown option", ["build", "--nope"], 2),
    ("compare: unknown recipe", ["compare", "--programs", "magic@W8A8"], 2),
    ("eval: missing program", ["eval", "MISSING"], 2),
    ("eval: missing --data", ["eval", "PROGRAM", "--data", "MISSING"], 2),
    ("bench: unknown device", ["bench", "PROGRAM", "--device", "nowhere"], 2),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=7, help="runs per command (the median is reported)")
    ap.add_argument("--out", default=str(REPO / "docs" / "cli-latency.md"))
    ap.add_argument("--program", default=str(REPO / "build" / "rpi4"),
                    help="a finished build for the eval/bench cases (default: the README's main job, build/rpi4)")
    args = ap.parse_args()
    script = Path(sys.executable).parent / "vitq-edge"
    command = "python tools/cli_latency.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        program = Path(args.program).absolute()
        for what, argv, code in COMMANDS:
            if "PROGRAM" in argv and not (program / "manifest.json").is_file():
                print(f"{what}: skipped, no build at {program} (run `vitq-edge build --target rpi4` first)",
                      file=sys.stderr)
                continue
            argv = [a.replace("MISSING", str(tmp / "missing")).replace("PROGRAM", str(program)) for a in argv]
            times, stderr, exit_code = [], "", None
            for _ in range(args.runs):
                t0 = time.perf_counter()
                proc = subprocess.run([str(script), *argv], capture_output=True, text=True, cwd=tmp)
                times.append(time.perf_counter() - t0)
                stderr, exit_code = proc.stderr.strip(), proc.returncode
            if exit_code != code:
                print(f"error: `vitq-edge {shlex.join(argv)}` exited {exit_code}, expected {code}: {stderr[-500:]}",
                      file=sys.stderr)
                return 1
            shown = stderr.splitlines()[0] if stderr else ""
            display = shlex.join(["vitq-edge", *argv]).replace(str(tmp), "TMP").replace(str(REPO) + "/", "")
            rows.append((what, display, statistics.median(times), max(times), shown.replace(str(tmp), "TMP")))
            print(f"{what}: median {statistics.median(times):.2f} s", file=sys.stderr)
    lines = [
        "# How fast the CLI answers without work",
        "",
        f"Command: `{command}`; {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} CPU cores. Each command is a fresh process ({args.runs} runs: median and slowest wall "
        f"time). Target: under {TARGET_S} s.",
        "",
        "| case | command | median s | slowest s | stderr |",
        "|---|---|---|---|---|",
    ]
    for what, display, median, slowest, shown in rows:
        lines.append(f"| {what} | `{display}` | {median:.2f} | {slowest:.2f} | {shown.replace('|', '/')} |")
    worst = max(r[2] for r in rows)
    verdict = "within" if worst < TARGET_S else "OVER"
    lines += ["", f"Slowest median: {worst:.2f} s ({verdict} the {TARGET_S} s target).", ""]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
