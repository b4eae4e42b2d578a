"""Quantization recipes: configs as data, one entry point (`quantize`)."""

from vitq_edge.quant.recipes import RECIPES, QuantizedModel, RecipeConfig, quantize, recipe_config

__all__ = ["RECIPES", "QuantizedModel", "RecipeConfig", "quantize", "recipe_config"]
