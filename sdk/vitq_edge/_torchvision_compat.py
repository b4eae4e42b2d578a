"""Let timm import on a CPU-only torch whose torchvision wheel cannot load its ops.

timm imports torchvision at import time. The torchvision wheel pulled from the
registry is a CUDA build; its compiled ops fail to load next to a CPU torch, and
`torchvision/_meta_registrations.py` then raises
``RuntimeError: operator torchvision::nms does not exist``.  Nothing in vitq-edge
uses torchvision's ops, so when (and only when) that happens we declare the two
schemas it registers fake kernels for and import it again.  Where torchvision
loads normally this module does nothing.

The check runs when something first imports timm (an import hook that `import vitq_edge`
installs), not at `import vitq_edge`: importing torch takes seconds, and the CLI's help
and usage errors should not wait for it. Code that imports torchvision itself before
timm calls `ensure_torchvision_importable()` first.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from typing import Any

# Kept alive for the life of the process: dropping a Library removes its schemas.
_SCHEMA_LIB: Any = None
_PATCHED: bool | None = None  # None: not checked yet

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def _forget_torchvision() -> None:
    for name in list(sys.modules):
        if name == "torchvision" or name.startswith("torchvision."):
            del sys.modules[name]


def ensure_torchvision_importable() -> bool:
    """Import torchvision, patching its missing op schemas if needed.

    Returns True when the workaround was applied, False when torchvision
    imported on its own (or is not installed at all).
    """
    global _PATCHED
    if _PATCHED is None:
        _PATCHED = _import_torchvision()
    return _PATCHED


def _import_torchvision() -> bool:
    global _SCHEMA_LIB
    try:
        importlib.import_module("torchvision")
        return False
    except ModuleNotFoundError as exc:
        if exc.name == "torchvision":
            return False
        raise
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
    _forget_torchvision()
    if _SCHEMA_LIB is None:
        from torch.library import Library

        _SCHEMA_LIB = Library("torchvision", "DEF")
        for schema in _SCHEMAS:
            _SCHEMA_LIB.define(schema)
    importlib.import_module("torchvision")
    return True


class _BeforeTimm(importlib.abc.MetaPathFinder):
    """Runs the check when `timm` is first imported, then leaves the import to the normal finders."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "timm":
            uninstall_timm_hook()
            ensure_torchvision_importable()
        return None


_HOOK = _BeforeTimm()


def install_timm_hook() -> None:
    """Check torchvision when timm is first imported (at once if timm is already imported)."""
    if "timm" in sys.modules:
        return
    if _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)


def uninstall_timm_hook() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)
