"""What the CLI offers for reading images, without importing the readers (numpy, PIL, torch)."""

# Resize interpolations, by timm's names (data/preprocess.py maps them to PIL's filters).
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")

# Larger images are refused before decoding (`--max-image-pixels`): a decompression bomb
# of a few KB can declare billions of pixels. 2**28 (268 M pixels, 16384 x 16384) admits
# any real photo; decoding one that large takes ~0.8 GB (RGB).
DEFAULT_MAX_IMAGE_PIXELS = 1 << 28
