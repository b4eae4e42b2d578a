"""vitq-edge: quantize timm Vision Transformers and lower them to ExecuTorch for ARM.

Importing the package is cheap (no torch): the CLI answers --help and usage errors at
once, and each command imports what it needs.
"""

from __future__ import annotations

from vitq_edge._torchvision_compat import ensure_torchvision_importable, install_timm_hook

__version__ = "0.1.0"  # the one version string: pyproject.toml and runtime/CMakeLists.txt read it

# timm imports torchvision, whose wheel may not load next to a CPU torch: patched on first import of timm.
install_timm_hook()

__all__ = ["__version__", "ensure_torchvision_importable"]


def __getattr__(name: str) -> object:
    if name == "TORCHVISION_PATCHED":  # whether torchvision needed the patch (checks it now if not yet)
        return ensure_torchvision_importable()
    raise AttributeError(f"module 'vitq_edge' has no attribute {name!r}")
