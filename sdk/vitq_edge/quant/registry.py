"""The `quantize` verb: the handler registered for a config's type quantizes the model.

Each recipe module (`quant/adfq.py`, `liu2021.py`, `minmax.py`, `stock.py`) registers its
handler with `register_recipe`; `vitq_edge.quant` imports them all. This module imports
none of them, so every recipe can import it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from vitq_edge.errors import VitqError
from vitq_edge.recipes import RecipeConfig


@dataclass
class QuantizedModel:
    """The result of `quantize`: a module to simulate with and to lower."""

    module: torch.nn.Module
    recipe: str
    bits: str
    # Ops whose arithmetic stays float in the deployed program (written to the manifest).
    float_ops: list[str] = field(default_factory=list)
    # Paper recipes: weights packed at their bit width + float32 for the rest (vit.model_size_bytes).
    size_bytes: int | None = None
    # Recipe-specific facts for the manifest: quantizers, outlier fractions, mixed-precision bits.
    details: dict = field(default_factory=dict)
    # The config the recipe ran with, where it chose a default itself (adfq's iterations); else None.
    config: RecipeConfig | None = None


Handler = Callable[[torch.nn.Module, RecipeConfig, Iterable[torch.Tensor], tuple], QuantizedModel]
_HANDLERS: dict[type, Handler] = {}


def register_recipe(config_type: type) -> Callable[[Handler], Handler]:
    def wrap(fn: Handler) -> Handler:
        _HANDLERS[config_type] = fn
        return fn

    return wrap


def quantize(
    model: torch.nn.Module,
    config: RecipeConfig,
    calib_batches: Iterable[torch.Tensor],
    example_inputs: tuple,
) -> QuantizedModel:
    """Quantize `model` (eval mode, float) as `config` says, calibrating on `calib_batches`."""
    handler = _HANDLERS.get(type(config))
    if handler is None:
        raise VitqError(f"no handler registered for recipe config {type(config).__name__}")
    return handler(model, config, calib_batches, example_inputs)
