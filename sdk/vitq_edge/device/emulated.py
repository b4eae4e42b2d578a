"""`--device emulated-rpi4` / `emulated-rpi5`: the aarch64 bundle under qemu-user.

    qemu-aarch64 -cpu cortex-a72 -L build/runtime/pi-prefix/rpi4 \\
        [-plugin build/runtime/qemu-plugin/libinsn_count.so,out=insn.json] \\
        build/runtime/aarch64/bin/vitq-runner ...

The `-L` prefix (tools/make_pi_prefix.py) gives the guest a Pi's /proc/cpuinfo and /sys,
so XNNPACK picks the kernels it picks on the board. Wall time under emulation does not
rank kernels; the instruction count of each inference does. It comes from the
insn_count TCG plugin (runtime/qemu_plugin/insn_count.c), which snapshots its counter
at the runner's getppid() markers around every forward call. With one guest thread
(`--threads 1`) the counts repeat exactly run to run. With more, the plugin counts each
thread and each thread-pool task apart and the cost is the modelled N-thread critical
path (runtime/qemu_plugin/README.md), repeatable to a fraction of a percent.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from vitq_edge.device.base import LocalDevice, RunRequest, RunResult, instruction_summary, last_line
from vitq_edge.errors import VitqError
from vitq_edge.runtime import REPO, build_hint, runtime_dir, shown_path

QEMU = "qemu-aarch64"
PLUGIN = "libinsn_count.so"


@dataclass(frozen=True)
class Board:
    name: str
    qemu_cpu: str
    uarch: str  # what the runner's cpuinfo should report
    description: str
    cores: int = 4  # as the prefix's /proc/cpuinfo and /sys say (tools/make_pi_prefix.py)


BOARDS = {
    "rpi4": Board("rpi4", "cortex-a72", "cortex-a72", "Raspberry Pi 4 (4x Cortex-A72), emulated by qemu-user"),
    "rpi5": Board("rpi5", "cortex-a76", "cortex-a76", "Raspberry Pi 5 (4x Cortex-A76), emulated by qemu-user"),
}


def find_qemu() -> str:
    """$VITQ_QEMU (a path or a command name), else `qemu-aarch64` on PATH."""
    configured = os.environ.get("VITQ_QEMU")
    if configured:
        found = shutil.which(configured)
        if found is None:
            raise VitqError(f"VITQ_QEMU={configured} does not exist or is not executable; point it at "
                            f"{QEMU} (the dynamic build, from `apt-get install qemu-user`) or unset it")
        return found
    found = shutil.which(QEMU)
    if found is None:
        raise VitqError(f"{QEMU} is not installed (not on PATH); install it with `apt-get install qemu-user` "
                        "or set VITQ_QEMU to its path")
    return found


def plugin_path() -> Path:
    """$VITQ_QEMU_PLUGIN, else <runtime dir>/qemu-plugin/libinsn_count.so."""
    configured = os.environ.get("VITQ_QEMU_PLUGIN")
    return Path(configured).expanduser() if configured else runtime_dir() / "qemu-plugin" / PLUGIN


class EmulatedDevice(LocalDevice):
    emulated = True
    bundle_name = "aarch64"

    def __init__(self, board: str):
        self.board = BOARDS[board]
        self.name = f"emulated-{board}"
        self.cores = self.board.cores
        self.prefix = runtime_dir() / "pi-prefix" / board
        self.qemu = ""
        self.plugin: Path | None = None

    def describe(self) -> dict:
        return {"device": self.name, "kind": "emulated", "cpu": self.board.qemu_cpu,
                "board": self.board.description, "emulator": self.qemu or QEMU, "prefix": str(self.prefix)}

    def prepare(self) -> None:
        self.qemu = find_qemu()
        if not (self.prefix / "proc" / "cpuinfo").is_file():
            raise VitqError(f"the qemu {self.board.name} prefix is missing ({shown_path(self.prefix)}); create it with "
                            f"`python3 {shown_path(REPO / 'tools' / 'make_pi_prefix.py')}` or {build_hint('aarch64')}")
        if not (self.prefix / "lib" / "ld-linux-aarch64.so.1").exists():
            raise VitqError(f"{shown_path(self.prefix / 'lib')} does not lead to an aarch64 sysroot; install it with "
                            "`apt-get install g++-aarch64-linux-gnu` and rerun `python3 tools/make_pi_prefix.py`")
        plugin = plugin_path()
        self.plugin = plugin if plugin.is_file() else None

    def launcher(self, counts_path: Path | None, threads: int) -> list[str]:
        cmd = [self.qemu, "-cpu", self.board.qemu_cpu, "-L", str(self.prefix)]
        if counts_path is not None and self.plugin is not None:
            # The plugin's arguments are comma-separated: a comma in a path would split it.
            if "," in str(self.plugin) or "," in str(counts_path):
                raise VitqError(f"the qemu plugin path {self.plugin} or the temporary folder contains a comma, "
                                "which qemu's -plugin option cannot take; move it (or set TMPDIR)")
            # One thread: the inline counter (fast, exact). More: the schedule mode, which
            # counts per thread and per pool task and models the N-thread critical path
            # (0 = the runner's default pool, one thread per core of the board).
            pool = threads or self.cores
            cmd += ["-plugin", f"{self.plugin},out={counts_path}" + (f",threads={pool}" if pool > 1 else "")]
        return cmd

    def explain_failure(self, stderr: str) -> str | None:
        line = last_line(stderr)
        if "plugin" in line.lower():
            return (f"qemu could not load the instruction-count plugin {self.plugin} ({line}); it needs the dynamic "
                    f"qemu-aarch64 (not -static); rebuild the plugin ({build_hint('aarch64')}) or unset "
                    "VITQ_QEMU_PLUGIN")
        if line.startswith(("qemu", os.path.basename(self.qemu) + ":")):
            return f"qemu failed on {self.name}: {line}"
        return None

    def read_counts(self, counts_path: Path | None, req: RunRequest, result: RunResult) -> None:
        uarch = (result.report.get("cpu") or {}).get("uarch")
        if uarch and uarch != self.board.uarch:
            result.notes.append(f"XNNPACK detected {uarch}, not {self.board.uarch}: the kernels differ from the "
                                f"board's; regenerate the prefix with `python3 tools/make_pi_prefix.py`")
        if not req.count_instructions:
            return
        if self.plugin is None:
            result.notes.append(f"instruction counts skipped: the qemu plugin {shown_path(plugin_path())} is not built "
                                f"({build_hint('aarch64')})")
            return
        try:
            counts = json.loads(counts_path.read_text())
        except (OSError, ValueError):
            result.notes.append(f"instruction counts skipped: the qemu plugin {self.plugin} wrote no report")
            return
        threads = int(result.report.get("threads", req.threads))
        result.instructions = instruction_summary(counts, req.warmup, threads)
        if not result.instructions["exact"]:
            why = counts.get("error") or "a shared counter with several threads"
            result.notes.append(f"instruction counts are approximate ({why}; {result.instructions['min']:,}.."
                                f"{result.instructions['max']:,}); rebuild the runner and the plugin "
                                f"({build_hint('aarch64')}) or use --threads 1")
