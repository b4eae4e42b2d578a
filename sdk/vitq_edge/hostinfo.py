"""This machine in words, for manifests, benches and tables (a leaf: no vitq_edge imports).

The CPU is part of a result's provenance twice over: a latency belongs to the CPU that
measured it, and a paper recipe's calibration runs torch's float kernels, which dispatch on the
CPU's vector width. On the real model, adfq with the same inputs and seed learns other weights
under ATEN_CPU_CAPABILITY=avx2 than under the AVX512 kernels (2026-12-07, 16 images, 10
iterations), so the same build command on another CPU can give a program with other bytes.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else the machine type."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.machine())


def host_description() -> str:
    """e.g. 'Linux x86_64, AMD EPYC 9B14, 2 CPU cores'."""
    return f"{platform.system()} {platform.machine()}, {cpu_model()}, {os.cpu_count()} CPU cores"


def torch_description() -> str:
    """torch's version and the CPU capability its kernels dispatch to, e.g. 'torch 2.13.0+cpu (AVX512)'."""
    import torch  # only the callers that calibrate or evaluate need it (the CLI's fast paths do not)

    return f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()})"


def build_machine(host: str | None, torch_info: str | None) -> str:
    """A build's machine in one line, from a manifest's `host` and `torch` (either may be missing in
    older manifests); the form compare's table header and rows share, so that they compare equal."""
    return ", ".join(filter(None, (host, torch_info)))


def this_build_machine() -> str:
    """build_machine() of this machine, as a build here records it."""
    return build_machine(host_description(), torch_description())
