"""Export a (quantized) model into an ExecuTorch program delegated to XNNPACK.

Paper recipes are lowered through their integer program (lower/integer_vit.py): the
`vitq::` ops stay in the graph as calls into libvitq_kernels.so, XNNPACK takes the float
glue around them. A quantized model the kernels cannot run (`NotLowerable`, e.g. mixed
precision wider than 8 bits) is lowered as its simulation instead, and says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
from executorch.exir import to_edge_transform_and_lower

from vitq_edge.lower.integer_vit import NotLowerable, integer_vit
from vitq_edge.progress import steps
from vitq_edge.quant import vit


@dataclass
class LoweredProgram:
    buffer: bytes
    delegate_calls: int  # XNNPACK partitions: each boundary is a float/int hand-over
    non_delegated_ops: list[str]
    custom_ops: list[str] = field(default_factory=list)  # vitq:: ops, run by libvitq_kernels.so
    # "integer" (vitq:: kernels), "float" (stock programs) or why a paper recipe stayed simulated.
    arithmetic: str = "float"


def lower_to_executorch(module: torch.nn.Module, example_inputs: tuple, integer: bool = False) -> LoweredProgram:
    """Lower `module`; with `integer`, a quantized ViT (quant/vit.py) goes through the vitq:: kernels."""
    arithmetic = "float"
    if integer:
        try:
            module = integer_vit(module)
            arithmetic = "integer"
        except NotLowerable as why:
            arithmetic = f"simulated in float ops: {why}"
    # A simulation that stayed in float ops is exported as its fake-quant forward (torch's ops).
    with steps("exporting", 3) as done, vit.arithmetic("fake-quant"):
        exported = torch.export.export(module, example_inputs, strict=False)
        done("torch.export")
        edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
        done("XNNPACK partitioning")
        # Read the partitioning before to_executorch(), which rewrites the graph in place
        # (out variants, memory planning).
        delegate_calls, others = _partition_summary(edge.exported_program().graph_module.graph)
        program = edge.to_executorch()
        done("to_executorch")
    custom = sorted(op for op in others if op.startswith("vitq."))
    return LoweredProgram(program.buffer, delegate_calls, [op for op in others if op not in custom],
                          [op.replace(".", "::", 1).removesuffix(".default") for op in custom], arithmetic)


def _partition_summary(graph: torch.fx.Graph) -> tuple[int, list[str]]:
    """(number of XNNPACK delegate calls, sorted names of the ops left outside)."""
    delegate_calls = 0
    others: set[str] = set()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if "executorch_call_delegate" in name:
            delegate_calls += 1
        elif name != "getitem":
            others.add(name)
    return delegate_calls, sorted(others)
