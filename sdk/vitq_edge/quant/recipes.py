"""Recipes as config objects and the single `quantize` verb that applies them.

Like torchao's `quantize_(model, config)`: a config is a small frozen dataclass that
says *what*; a handler registered for its type says *how*. The CLI only turns flags
into a config (`recipe_config`).

    from vitq_edge.quant import quantize, XnnpackInt8Config
    qm = quantize(model, XnnpackInt8Config(), calib_batches, example_input)
    qm.module(x)            # the simulated model: what the device computes
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from vitq_edge.errors import VitqError


@dataclass(frozen=True)
class RecipeConfig:
    """Base of every recipe config."""

    name = "base"
    supported_bits: tuple[str, ...] = ()

    @property
    def bits(self) -> str:
        return self.supported_bits[0]


@dataclass(frozen=True)
class Fp32Config(RecipeConfig):
    """No quantization: the float model lowered to XNNPACK's fp32 kernels."""

    name = "fp32"
    supported_bits: tuple[str, ...] = ("fp32",)


@dataclass(frozen=True)
class XnnpackInt8Config(RecipeConfig):
    """ExecuTorch's stock PT2E flow: XNNPACKQuantizer, symmetric int8, static activations.

    Weights per output channel (`per_channel=True`) or per tensor. This is what an
    ExecuTorch user gets out of the box: the baseline the paper recipes must beat.
    """

    name = "xnnpack-int8"
    supported_bits: tuple[str, ...] = ("W8A8",)
    per_channel: bool = True


@dataclass
class QuantizedModel:
    """The result of `quantize`: a module to simulate with and to lower."""

    module: torch.nn.Module
    recipe: str
    bits: str
    # Ops whose arithmetic stays float in the deployed program (written to the manifest).
    float_ops: list[str] = field(default_factory=list)
    custom_ops: list[str] = field(default_factory=list)


Handler = Callable[[torch.nn.Module, RecipeConfig, Iterable[torch.Tensor], tuple], QuantizedModel]
_HANDLERS: dict[type, Handler] = {}


def register_recipe(config_type: type) -> Callable[[Handler], Handler]:
    def wrap(fn: Handler) -> Handler:
        _HANDLERS[config_type] = fn
        return fn

    return wrap


RECIPES: dict[str, type[RecipeConfig]] = {c.name: c for c in (Fp32Config, XnnpackInt8Config)}


def recipe_config(name: str, bits: str | None = None) -> RecipeConfig:
    """The config for a recipe name as typed on the command line."""
    if name not in RECIPES:
        raise VitqError(f"unknown recipe '{name}': choose one of {', '.join(RECIPES)}")
    config = RECIPES[name]()
    if bits is not None and bits not in config.supported_bits:
        raise VitqError(f"recipe {name} supports --bits {', '.join(config.supported_bits)}, not '{bits}'")
    return config


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


# Handlers live next to their algorithms; importing registers them.
from vitq_edge.quant import stock  # noqa: E402,F401
