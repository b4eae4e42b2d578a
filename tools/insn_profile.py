"""Where a program's instructions go on an emulated Pi: guest instructions per inference by
function, and the hottest blocks, from the hot_blocks qemu plugin (runtime/qemu_plugin/
hot_blocks.c) -- a profile in exact counts, for finding what to make cheaper.

    python tools/insn_profile.py build/cost-adfq-W8A8-iters0 --device emulated-rpi4
    python tools/insn_profile.py model.pte --device emulated-rpi5 --blocks 40 --out /tmp/profile.md

Runs vitq-runner under qemu at one thread (one warmup call, left out, then one timed call),
with the guest's dynamic loader reporting where each library lies (LD_DEBUG=files), and
names every block by the nearest preceding function symbol of its library
(aarch64-linux-gnu-nm). Inlined code counts under the function it was inlined into. The
total is `vitq-edge bench --device ... --threads 1`'s count of the same program, to within a
few instructions (bench's runner reads an input file; this one makes its synthetic image).
"""

from __future__ import annotations

import argparse
import bisect
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from vitq_edge.artifacts import write_atomic
from vitq_edge.device.emulated import BOARDS, find_qemu
from vitq_edge.errors import VitqError
from vitq_edge.lifetime import run_script
from vitq_edge.runtime import find_bundle, runtime_dir

NM = "aarch64-linux-gnu-nm"
LINK_MAP = re.compile(r"file=(\S+) \[\d+\];\s+generating link map\n.*?base: 0x([0-9a-f]+)\s+size: 0x([0-9a-f]+)")


@dataclass
class Library:
    path: str
    base: int
    size: int
    starts: list[int]
    names: list[str]

    def function(self, address: int) -> str:
        i = bisect.bisect_right(self.starts, address - self.base) - 1
        return self.names[i] if i >= 0 else "?"


def load_library(path: str, base: int, size: int) -> Library:
    """The library's function symbols (demangled), sorted by address."""
    try:
        listing = subprocess.run([NM, "-C", "--defined-only", "-n", path], capture_output=True, text=True,
                                 check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        listing = ""  # stripped or unreadable: its blocks count under the library's name
    starts, names = [], []
    for line in listing.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[1] in "tTwW":
            starts.append(int(parts[0], 16))
            names.append(parts[2])
    return Library(path, base, size, starts, names)


def profile(program: Path, device: str, workdir: Path) -> tuple[list[tuple[str, str, int, int, int]], int]:
    """[(library, function, offset in it, instructions per execution, executions per inference)], spans."""
    board = BOARDS[device.removeprefix("emulated-")]
    plugin = runtime_dir() / "qemu-plugin" / "libhot_blocks.so"
    if not plugin.is_file():
        raise VitqError(f"the hot_blocks plugin is not built ({plugin}); run `bash tools/build_runtime.sh plugin`")
    bundle = find_bundle("aarch64")
    out = workdir / "blocks.txt"
    cmd = [find_qemu(), "-E", "LD_DEBUG=files", "-cpu", board.qemu_cpu, "-L", str(runtime_dir() / "pi-prefix" /
           board.name), "-plugin", f"{plugin},out={out},skip=1", str(bundle.runner), "--warmup", "1", "--runs", "1",
           "--threads", "1", "--kernels", str(bundle.lib / "libvitq_kernels.so"), str(program)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file():
        said = [line for line in proc.stderr.splitlines() if line.strip() and not re.match(r"\s*\d+:", line)]
        last = (said or ["no output"])[-1]  # the runner's or qemu's last word, not the loader's (LD_DEBUG)
        raise VitqError(f"the profiled run failed (exit {proc.returncode}): {last}")
    libraries = [load_library(m[1], int(m[2], 16), int(m[3], 16)) for m in LINK_MAP.finditer(proc.stderr)]
    lines = out.read_text().splitlines()
    spans = int(lines[0].split("spans=")[1])
    merged: Counter = Counter()
    for line in lines[1:]:
        pc, insns, executions = (int(v, 16) if i == 0 else int(v) for i, v in enumerate(line.split()))
        merged[pc, insns] += executions
    rows = []
    for (pc, insns), executions in merged.items():
        lib = next((lb for lb in libraries if lb.base <= pc < lb.base + lb.size), None)
        rows.append((Path(lib.path).name if lib else "(runner or loader)", lib.function(pc) if lib else "?",
                     pc - lib.base if lib else pc, insns, executions // max(spans, 1)))
    return rows, spans


def short(name: str, width: int = 90) -> str:
    name = re.sub(r"\(anonymous namespace\)::", "", name)
    return name if len(name) <= width else name[: width - 3] + "..."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("program", help="a build folder or a .pte")
    ap.add_argument("--device", default="emulated-rpi4", choices=[f"emulated-{b}" for b in BOARDS])
    ap.add_argument("--functions", type=int, default=25, help="functions listed (default 25)")
    ap.add_argument("--blocks", type=int, default=25, help="hottest blocks listed (default 25)")
    ap.add_argument("--out", help="also write the tables to this .md file")
    args = ap.parse_args()
    program = Path(args.program)
    program = program / "model.pte" if program.is_dir() else program
    if not program.is_file():
        raise VitqError(f"no program at {program}: give a build folder holding model.pte, or a .pte file")
    with tempfile.TemporaryDirectory(prefix="vitq-profile-") as tmp:
        rows, spans = profile(program, args.device, Path(tmp))
    total = sum(insns * executions for _, _, _, insns, executions in rows)
    per_function: Counter = Counter()
    for lib, function, _, insns, executions in rows:
        per_function[lib, function] += insns * executions
    command = "python tools/insn_profile.py " + " ".join(sys.argv[1:])
    text = [f"# Instruction profile: {program} on {args.device}", "", f"    {command}", "",
            f"{total:,} guest instructions per inference (one thread; the timed call of {spans}).", "",
            "| M instructions | % | library | function |", "|---:|---:|---|---|"]
    for (lib, function), n in per_function.most_common(args.functions):
        text.append(f"| {n / 1e6:,.1f} | {100 * n / total:.1f} | {lib} | `{short(function)}` |")
    text += ["", "Hottest blocks (a block: straight-line code from a branch target to a branch):", "",
             "| M instructions | instructions x executions | offset | function |", "|---:|---:|---:|---|"]
    hottest = sorted(rows, key=lambda r: r[3] * r[4], reverse=True)[: args.blocks]
    for lib, function, offset, insns, executions in hottest:
        text.append(f"| {insns * executions / 1e6:,.1f} | {insns} x {executions:,} | {lib}+{offset:#x} | "
                    f"`{short(function, 60)}` |")
    report = "\n".join(text) + "\n"
    print(report, end="")
    if args.out:
        write_atomic(Path(args.out), lambda f: f.write(report.encode()))


if __name__ == "__main__":
    run_script(main)
