"""Let timm import on a CPU-only torch whose torchvision wheel cannot load its ops.

timm imports torchvision at import time. The torchvision wheel pulled from the
registry is a CUDA build; its compiled ops fail to load next to a CPU torch, and
`torchvision/_meta_registrations.py` then raises
``RuntimeError: operator torchvision::nms does not exist``.  Nothing in vitq-edge
uses torchvision's ops, so when (and only when) that happens we declare the two
schemas it registers fake kernels for and import it again.  Where torchvision
loads normally this module does nothing.
"""

from __future__ import annotations

import importlib
import sys

from torch.library import Library

# Kept alive for the life of the process: dropping a Library removes its schemas.
_SCHEMA_LIB: Library | None = None

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
        _SCHEMA_LIB = Library("torchvision", "DEF")
        for schema in _SCHEMAS:
            _SCHEMA_LIB.define(schema)
    importlib.import_module("torchvision")
    return True
