"""The `minmax` recipe: the naive post-training baseline every paper compares against."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from vitq_edge.quant import vit
from vitq_edge.quant.calibration import batches, package, resolve_device, stack_calibration
from vitq_edge.quant.quantizers import Quantizer, UniformQuantizer
from vitq_edge.quant.registry import QuantizedModel, register_recipe
from vitq_edge.recipes import BitsFor, MinMaxConfig, layer_bits


def minmax_factory(bits_for: BitsFor):
    """Per-output-channel symmetric weights; per-tensor asymmetric activations, min/max ranges."""

    def make(op: str, role: str) -> Quantizer:
        w_bits, a_bits = bits_for(op)
        if role == "weight":
            return UniformQuantizer(w_bits, signed=True, granularity="channel", init="minmax")
        return UniformQuantizer(a_bits, signed=False, granularity="tensor", init="minmax")

    return make


@register_recipe(MinMaxConfig)
def quantize_minmax(model: torch.nn.Module, config: MinMaxConfig, calib: Iterable[torch.Tensor],
                    example_inputs: tuple) -> QuantizedModel:
    device = resolve_device(config.device)
    x = stack_calibration(calib)
    qmodel = vit.quantize_vit(model, minmax_factory(layer_bits(config))).to(device)
    vit.calibrate_activations(qmodel, (b.to(device) for b in batches(x, config.batch_size)))
    return package(qmodel, config)
