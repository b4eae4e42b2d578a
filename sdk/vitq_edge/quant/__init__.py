"""Quantization recipes: configs as data (`vitq_edge.recipes`), one entry point (`quantize`).

Importing this package imports every recipe module, which registers its handler.
"""

from vitq_edge.quant import adfq, liu2021, minmax, stock  # noqa: F401  (registers the handlers)
from vitq_edge.quant.registry import QuantizedModel, quantize
from vitq_edge.recipes import (
    RECIPES,
    AdfqConfig,
    Fp32Config,
    Liu2021Config,
    MinMaxConfig,
    RecipeConfig,
    XnnpackInt8Config,
    recipe_config,
)

__all__ = ["RECIPES", "AdfqConfig", "Fp32Config", "Liu2021Config", "MinMaxConfig", "QuantizedModel",
           "RecipeConfig", "XnnpackInt8Config", "quantize", "recipe_config"]
