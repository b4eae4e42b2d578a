"""vitq-edge: quantize timm Vision Transformers and lower them to ExecuTorch for ARM."""

from vitq_edge._torchvision_compat import ensure_torchvision_importable

# Must run before anything imports timm (which imports torchvision).
TORCHVISION_PATCHED = ensure_torchvision_importable()

__version__ = "0.1.0"
