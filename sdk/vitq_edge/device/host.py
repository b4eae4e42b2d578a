"""`--device host`: the host runner bundle (build/runtime/host), run directly on this machine.

Unlike the default of `vitq-edge eval` (ExecuTorch's Python runtime inside this process),
this is the same C++ runner that runs on the Pi, built for this machine's CPU.
"""

from __future__ import annotations

import os
import platform

from vitq_edge.device.base import LocalDevice
from vitq_edge.runtime import host_machine


class HostDevice(LocalDevice):
    name = "host"
    bundle_name = "host"
    cores = os.cpu_count()

    def describe(self) -> dict:
        return {"device": self.name, "kind": "host", "cpu": platform.processor() or host_machine(),
                "machine": host_machine(), "runner": "build/runtime/host (native)"}
