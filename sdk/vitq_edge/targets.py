"""Deployment targets: which CPU and ABI a build is for."""

from __future__ import annotations

import platform
from dataclasses import dataclass

from vitq_edge.errors import VitqError


@dataclass(frozen=True)
class Target:
    name: str
    cpu: str
    abi: str
    description: str


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("host", platform.machine() or "unknown", f"{platform.system().lower()}-{platform.machine()}",
               "this machine (runs the .pte in the ExecuTorch Python runtime)"),
        Target("rpi4", "Cortex-A72", "aarch64-linux-gnu", "Raspberry Pi 4, 64-bit Raspberry Pi OS"),
        Target("rpi5", "Cortex-A76", "aarch64-linux-gnu", "Raspberry Pi 5, 64-bit Raspberry Pi OS"),
        Target("android-arm64", "ARMv8-A (arm64-v8a)", "aarch64-linux-android", "Android phones, arm64-v8a"),
    )
}


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise VitqError(f"unknown target '{name}': choose one of {', '.join(TARGETS)}") from None
