"""The stock recipes: fp32, and ExecuTorch's PT2E int8 flow for XNNPACK."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from vitq_edge.quant.registry import QuantizedModel, register_recipe
from vitq_edge.recipes import Fp32Config, XnnpackInt8Config

# What stays float in the stock int8 program (XNNPACKQuantizer annotates only linear,
# conv, matmul and a few elementwise patterns; measured: 62 partitions on DeiT-Tiny).
STOCK_INT8_FLOAT_OPS = ["layer_norm", "softmax", "gelu", "attention scaling", "residual add"]


@register_recipe(Fp32Config)
def _fp32(model: torch.nn.Module, config: Fp32Config, calib: Iterable[torch.Tensor],
          example_inputs: tuple) -> QuantizedModel:
    return QuantizedModel(model, config.name, "fp32", float_ops=["all"])


@register_recipe(XnnpackInt8Config)
def _xnnpack_int8(model: torch.nn.Module, config: XnnpackInt8Config, calib: Iterable[torch.Tensor],
                  example_inputs: tuple) -> QuantizedModel:
    # Imported here: ExecuTorch and torchao take seconds to import, and only this recipe needs them.
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(
        get_symmetric_quantization_config(is_per_channel=config.per_channel, is_dynamic=False)
    )
    # Capture with a dynamic batch so calibration and evaluation can run in batches;
    # lowering re-exports the converted graph at the program's batch size.
    (example,) = example_inputs
    batched = (example.expand(2, *example.shape[1:]).contiguous(),)
    batch = torch.export.Dim("batch", min=1, max=4096)
    graph = torch.export.export(model, batched, dynamic_shapes=({0: batch},), strict=False).module()
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for batch in calib:
            prepared(batch)
    converted = convert_pt2e(prepared)
    return QuantizedModel(converted, config.name, config.bits, float_ops=list(STOCK_INT8_FLOAT_OPS))
