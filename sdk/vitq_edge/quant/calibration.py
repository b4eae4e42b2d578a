"""Plumbing shared by the paper recipes: calibration tensors, batching, packaging the result."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from vitq_edge.errors import VitqError
from vitq_edge.quant import vit
from vitq_edge.quant.registry import QuantizedModel
from vitq_edge.recipes import PaperRecipeConfig


def stack_calibration(calib_batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """All calibration images as one tensor (the paper recipes revisit them many times)."""
    batches = list(calib_batches)
    if not batches:
        raise VitqError("no calibration images: pass --calib DIR with at least one image")
    return torch.cat(batches)


def batches(x: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(x), size):
        yield x[start:start + size]


class _Captured(Exception):
    """Stops the forward once the op's inputs are captured."""


@torch.no_grad()
def capture_inputs(model: Callable[[torch.Tensor], torch.Tensor], op: torch.nn.Module, images: torch.Tensor,
                   batch_size: int) -> tuple[torch.Tensor, ...]:
    """The inputs `op` receives when `model` runs on `images` (the rest of the forward is skipped).

    Through the fake-quant forward: torch's own LayerNorm, GELU and softmax, the values the
    kernels' definitions give up to float rounding at a fraction of their cost (calibration
    runs the model many times; only the finished model must be bit-exact).
    """
    parts: list[tuple[torch.Tensor, ...]] = []

    def hook(module, args):
        parts.append(tuple(a.detach() for a in args))
        raise _Captured

    handle = op.register_forward_pre_hook(hook)
    try:
        with vit.arithmetic("fake-quant"):
            for b in batches(images, batch_size):
                try:
                    model(b)
                except _Captured:
                    pass
    finally:
        handle.remove()
    return tuple(torch.cat(p) for p in zip(*parts, strict=True))


class BlockInputs:
    """The inputs each op receives, from the input of its transformer block cached block by block.

    The recipes visit ops in forward order, enabling each op's quantizers once it is done.
    The input of block i is block i-1 applied to its own cached input under the quantizer
    settings of that moment, so capturing an op inside a block runs that one block, not
    the model's whole prefix; the head runs the final norm and head on the last block's
    output. Ops before the blocks (the patch embedding) run the model.
    """

    def __init__(self, qmodel: nn.Module, images: torch.Tensor, batch_size: int,
                 known: tuple[int, torch.Tensor] | None = None) -> None:
        """`known`: (i, the input of block i), when the caller already holds it (e.g. cached)."""
        self.qmodel, self.images, self.batch_size = qmodel, images, batch_size
        self.index: int | None = known[0] if known else None  # the block whose input self.x holds
        self.x: torch.Tensor | None = known[1] if known else None

    @torch.no_grad()
    def block_input(self, i: int) -> torch.Tensor:
        blocks = self.qmodel.blocks
        if self.index == i - 1 and self.x is not None:
            with vit.arithmetic("fake-quant"):  # as capture_inputs: calibration needs no bit-exact forward
                self.x = torch.cat([blocks[i - 1](b) for b in batches(self.x, self.batch_size)])
        elif self.index != i:
            (self.x,) = capture_inputs(self.qmodel, blocks[i], self.images, self.batch_size)
        self.index = i
        return self.x

    def of(self, name: str, op: nn.Module) -> tuple[torch.Tensor, ...]:
        parts = name.split(".")
        n = len(self.qmodel.blocks)
        if parts[0] == "blocks":
            return capture_inputs(self.qmodel.blocks[int(parts[1])], op, self.block_input(int(parts[1])),
                                  self.batch_size)
        if self.index is not None and self.index >= n - 1:  # after the blocks: timm's norm, then its head
            def tail(x: torch.Tensor) -> torch.Tensor:
                return self.qmodel.forward_head(self.qmodel.norm(x))

            return capture_inputs(tail, op, self.block_input(n), self.batch_size)
        return capture_inputs(self.qmodel, op, self.images, self.batch_size)


def resolve_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise VitqError(f"--calib-device {name}: no CUDA GPU is visible to torch here; use --calib-device cpu")
    return torch.device(name)  # the config checked the spelling


def package(qmodel: nn.Module, config: PaperRecipeConfig, details: dict | None = None) -> QuantizedModel:
    """The finished quantized model, on CPU, frozen, with what the manifest needs to know."""
    qmodel = qmodel.cpu().eval()
    for p in qmodel.parameters():
        p.requires_grad_(False)
    details = {**(details or {}), "quantizers": vit.describe_quantizers(qmodel)}
    return QuantizedModel(qmodel, config.name, config.bits, float_ops=list(vit.FLOAT_OPS),
                          size_bytes=vit.model_size_bytes(qmodel), details=details, config=config)
