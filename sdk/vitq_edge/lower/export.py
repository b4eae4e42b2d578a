"""Export a (quantized) model into an ExecuTorch program delegated to XNNPACK."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
from executorch.exir import to_edge_transform_and_lower

from vitq_edge.progress import steps


@dataclass
class LoweredProgram:
    buffer: bytes
    delegate_calls: int  # XNNPACK partitions: each boundary is a float/int hand-over
    non_delegated_ops: list[str]


def lower_to_executorch(module: torch.nn.Module, example_inputs: tuple) -> LoweredProgram:
    with steps("exporting", 3) as done:
        exported = torch.export.export(module, example_inputs, strict=False)
        done("torch.export")
        edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
        done("XNNPACK partitioning")
        # Read the partitioning before to_executorch(), which rewrites the graph in place
        # (out variants, memory planning).
        delegate_calls, others = _partition_summary(edge.exported_program().graph_module.graph)
        program = edge.to_executorch()
        done("to_executorch")
    return LoweredProgram(program.buffer, delegate_calls, others)


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
