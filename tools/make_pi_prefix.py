#!/usr/bin/env python3
"""Create qemu-user `-L` prefix directories that make a guest see a Raspberry Pi.

qemu-aarch64 hands the guest the host's /proc/cpuinfo and /sys, so cpuinfo (and
through it XNNPACK) cannot detect a Cortex-A72/A76 and picks other kernels than
on the device. qemu-user looks every guest file open up in the `-L` prefix
first and falls back to the host path, so a prefix holding a Pi's
/proc/cpuinfo and /sys/devices/system/cpu files fixes that. The prefix also
links `lib` to the aarch64 sysroot, which provides the dynamic loader
(/lib/ld-linux-aarch64.so.1) and the C/C++ runtime libraries.

    python3 tools/make_pi_prefix.py                      # rpi4 + rpi5 into build/runtime/pi-prefix
    python3 tools/make_pi_prefix.py --board rpi4 --out /tmp/pfx
    qemu-aarch64 -cpu cortex-a72 -L build/runtime/pi-prefix/rpi4 build/runtime/aarch64/bin/vitq-runner ...

Every file cpuinfo reads is written (not only the ones that identify the CPU),
because a missing one would silently fall back to the host's value.
Idempotent: re-running rewrites the files. Standard library only.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Board:
    name: str
    qemu_cpu: str  # the matching `qemu-aarch64 -cpu` model
    midr: int  # MIDR_EL1: implementer, variant, architecture, part, revision
    features: str  # /proc/cpuinfo "Features" as the board's kernel prints it
    max_khz: int
    min_khz: int
    model: str
    revision: str  # board revision code from /proc/cpuinfo
    hardware: str | None
    cores: int = 4

    @property
    def implementer(self) -> int:
        return (self.midr >> 24) & 0xFF

    @property
    def variant(self) -> int:
        return (self.midr >> 20) & 0xF

    @property
    def part(self) -> int:
        return (self.midr >> 4) & 0xFFF

    @property
    def cpu_revision(self) -> int:
        return self.midr & 0xF


BOARDS = {
    # Raspberry Pi 4 Model B: BCM2711, 4x Cortex-A72 r0p3, 1.5 GHz.
    "rpi4": Board(
        name="rpi4",
        qemu_cpu="cortex-a72",
        midr=0x410FD083,
        features="fp asimd evtstrm crc32 cpuid",
        max_khz=1500000,
        min_khz=600000,
        model="Raspberry Pi 4 Model B Rev 1.4",
        revision="d03114",
        hardware="BCM2835",
    ),
    # Raspberry Pi 5: BCM2712, 4x Cortex-A76 r4p1, 2.4 GHz (dot product, fp16).
    "rpi5": Board(
        name="rpi5",
        qemu_cpu="cortex-a76",
        midr=0x414FD0B1,
        features=("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"),
        max_khz=2400000,
        min_khz=1500000,
        model="Raspberry Pi 5 Model B Rev 1.0",
        revision="d04170",
        hardware=None,  # the Pi 5 kernel prints no Hardware line
    ),
}


def proc_cpuinfo(b: Board) -> str:
    blocks = []
    for i in range(b.cores):
        blocks.append(
            f"processor\t: {i}\n"
            "BogoMIPS\t: 108.00\n"
            f"Features\t: {b.features}\n"
            f"CPU implementer\t: 0x{b.implementer:02x}\n"
            "CPU architecture: 8\n"
            f"CPU variant\t: 0x{b.variant:x}\n"
            f"CPU part\t: 0x{b.part:03x}\n"
            f"CPU revision\t: {b.cpu_revision}\n"
        )
    tail = ""
    if b.hardware:
        tail += f"Hardware\t: {b.hardware}\n"
    tail += f"Revision\t: {b.revision}\nSerial\t\t: 100000000000cafe\nModel\t\t: {b.model}\n"
    return "\n".join(blocks) + "\n" + tail


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def make_prefix(b: Board, root: Path, sysroot: Path) -> Path:
    loader = sysroot / "lib" / "ld-linux-aarch64.so.1"
    if not loader.exists():
        sys.exit(
            f"make_pi_prefix: {loader} not found; install the aarch64 sysroot (apt-get install g++-aarch64-linux-gnu)"
        )
    root.mkdir(parents=True, exist_ok=True)

    # lib -> <sysroot>/lib: the guest's /lib/ld-linux-aarch64.so.1, libc,
    # libstdc++, ... (Debian's cross packages put them all there).
    lib = root / "lib"
    if lib.is_symlink():
        lib.unlink()
    elif lib.exists():
        sys.exit(f"make_pi_prefix: {lib} exists and is not a symlink; remove it or choose another --out")
    lib.symlink_to(sysroot / "lib")

    write(root / "proc" / "cpuinfo", proc_cpuinfo(b))

    last = b.cores - 1
    cpu = root / "sys" / "devices" / "system" / "cpu"
    cpulist = f"0-{last}\n"
    for name in ("possible", "present", "online"):
        write(cpu / name, cpulist)
    write(cpu / "kernel_max", f"{last}\n")  # cpuinfo: max processors = kernel_max + 1
    write(cpu / "offline", "\n")
    for i in range(b.cores):
        d = cpu / f"cpu{i}"
        # The kernel prints MIDR_EL1 as 0x%016llx.
        write(d / "regs" / "identification" / "midr_el1", f"0x{b.midr:016x}\n")
        write(d / "regs" / "identification" / "revidr_el1", f"0x{0:016x}\n")
        write(d / "online", "1\n")
        write(d / "cpufreq" / "cpuinfo_max_freq", f"{b.max_khz}\n")
        write(d / "cpufreq" / "cpuinfo_min_freq", f"{b.min_khz}\n")
        # One package, one cluster, no SMT.
        write(d / "topology" / "physical_package_id", "0\n")
        write(d / "topology" / "cluster_id", "0\n")
        write(d / "topology" / "core_id", f"{i}\n")
        write(d / "topology" / "core_siblings_list", cpulist)
        write(d / "topology" / "cluster_cpus_list", cpulist)
        write(d / "topology" / "package_cpus_list", cpulist)
        write(d / "topology" / "thread_siblings_list", f"{i}\n")
        write(d / "topology" / "core_cpus_list", f"{i}\n")
    write(
        root / "README",
        (
            f"qemu-user prefix emulating a {b.model} ({b.cores}x MIDR 0x{b.midr:08x}).\n"
            f"Use: qemu-aarch64 -cpu {b.qemu_cpu} -L {root} <aarch64 binary> ...\n"
            "Generated by tools/make_pi_prefix.py; safe to delete.\n"
        ),
    )
    return root


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--board", choices=[*BOARDS, "all"], default="all")
    ap.add_argument(
        "--out",
        type=Path,
        default=REPO / "build" / "runtime" / "pi-prefix",
        help="parent directory; each board goes to <out>/<board> (default: %(default)s)",
    )
    ap.add_argument(
        "--sysroot",
        type=Path,
        default=Path(os.environ.get("VITQ_AARCH64_SYSROOT", "/usr/aarch64-linux-gnu")),
        help="aarch64 sysroot holding lib/ld-linux-aarch64.so.1 (default: %(default)s)",
    )
    args = ap.parse_args(argv)
    boards = list(BOARDS) if args.board == "all" else [args.board]
    for name in boards:
        b = BOARDS[name]
        root = make_prefix(b, args.out / name, args.sysroot)
        print(f"make_pi_prefix: {root}  (qemu-aarch64 -cpu {b.qemu_cpu} -L {root})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
