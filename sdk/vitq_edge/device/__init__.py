"""Running a .pte: on this machine (ExecuTorch's Python runtime) and with vitq-runner on devices.

    host_runtime.py  ExecuTorch's Python runtime in this process (`vitq-edge eval` without --device)
    base.py          what devices share: the Device and Session interfaces, a run's request/result,
                     report parsing (the bundles themselves: vitq_edge/runtime.py)
    host.py          --device host: the host runner bundle
    emulated.py      --device emulated-rpi4 | emulated-rpi5: the aarch64 bundle under qemu-user
    ssh.py           --device ssh://user@host[:port]: a real board over SSH
"""

from __future__ import annotations

from vitq_edge.device.base import Device, RunRequest, RunResult, Session
from vitq_edge.errors import VitqError

DEVICES = ("host", "emulated-rpi4", "emulated-rpi5", "ssh://user@host[:port]")

__all__ = ["DEVICES", "Device", "RunRequest", "RunResult", "Session", "get_device"]


def get_device(spec: str) -> Device:
    """A device from its --device spelling (see DEVICES)."""
    spec = spec.strip()
    if spec == "host":
        from vitq_edge.device.host import HostDevice

        return HostDevice()
    if spec.startswith("emulated-"):
        from vitq_edge.device.emulated import BOARDS, EmulatedDevice

        board = spec.removeprefix("emulated-")
        if board in BOARDS:
            return EmulatedDevice(board)
    if spec.startswith("ssh://"):
        from vitq_edge.device.ssh import SshDevice

        return SshDevice(spec)
    raise VitqError(f"unknown device '{spec}': choose one of {', '.join(DEVICES)}")
