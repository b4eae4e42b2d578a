"""Liu et al.'s mixed precision: one bit width per MSA / MLP module, chosen by nuclear-norm sensitivity.

Sensitivity of module i at b bits: Omega_i(b) = ||Y_i||_* * ||Ŷ_i(b) - Y_i||^2, with Y the
attention map (MSA) or the output feature (MLP), Ŷ the same with only module i quantized
(its intervals searched as in the recipe, with fewer candidates), both averaged over the
calibration samples. With every other module float, module i's input is the float model's,
so each measurement starts at module i's block, from a cached float block input. The
configuration with the least total Omega whose weights fit the size of uniform N-bit
weights is found exactly (a Pareto-front knapsack over modules), where the paper sorts
Pareto candidates after HAWQ-V2. Candidate widths: N-2 .. N+2
({4..8} for a 6-bit budget; the paper's {6..10} for 8 bits stops at 8 here, the widest code the
integer kernels run). The patch embedding keeps `stem_bits`, the head `head_bits`. `mp_normalise="kind"`
puts the two kinds' sensitivities on one scale first (`normalise_per_kind`); `mp_output="block"`
measures both kinds on one quantity instead, their block's output (the residual stream), and
`mp_output="model"` on the model's output. `mp_output="quantized-model"` measures the model's output
too, but with every other module at N bits (the uniform model, searched once) instead of float: the
error of a width where it will run, on top of the others' (`quantized_context_errors`).
`mp_widths="weights"` gives a module's width to its weights alone, its ops' inputs staying at N bits
(sensitivities measured the same way).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from functools import partial

import torch

from vitq_edge.progress import StageClock, progress
from vitq_edge.quant import arith, vit
from vitq_edge.quant.calibration import BlockInputs, batches
from vitq_edge.recipes import BitsFor, Liu2021Config, layer_bits, parse_bits


def module_names(model: torch.nn.Module) -> list[str]:
    return [f"blocks.{i}.{part}" for i in range(len(model.blocks)) for part in ("attn", "mlp")]


def _block_of(module: str) -> int:
    return int(module.split(".")[1])  # blocks.3.attn -> 3


def _module_output(qmodel: torch.nn.Module, module: str, block_input: torch.Tensor, batch_size: int,
                   output: str = "module") -> torch.Tensor:
    """Y of a module: the (quantized, if enabled) attention probabilities or the MLP output; with
    output="block", the output of the module's block; with "model", the model's output (one
    quantity, one scale, for both kinds; "model" also counts what later blocks make of the error).

    The model runs from the module's own block on, on that block's input: with every other
    module float, it is the float model's block input whatever the module's quantizers do.
    """
    i = _block_of(module)
    if output == "model":
        def tail(x: torch.Tensor) -> torch.Tensor:
            for block in qmodel.blocks[i:]:
                x = block(x)
            return qmodel.forward_head(qmodel.norm(x))

        with torch.no_grad(), vit.arithmetic("fake-quant"):
            return torch.cat([tail(b) for b in batches(block_input, batch_size)])
    block = qmodel.blocks[i]
    if output == "block":
        target = block
    else:
        target = qmodel.get_submodule(f"{module}.av.a_quant" if module.endswith("attn") else module)
    outs: list[torch.Tensor] = []
    handle = target.register_forward_hook(lambda m, args, out: outs.append(out.detach()))
    try:
        # The fake-quant forward: the integer one computes the probabilities without calling a_quant.
        with torch.no_grad(), vit.arithmetic("fake-quant"):
            for b in batches(block_input, batch_size):
                block(b)
    finally:
        handle.remove()
    return torch.cat(outs)


def float_block_inputs(reference: torch.nn.Module, images: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Every block's input on `images` with every quantizer of `reference` off (the float model's)."""
    walk = BlockInputs(reference, images, batch_size)
    return [walk.block_input(i) for i in range(len(reference.blocks))]


def module_search(qmodel: torch.nn.Module, images: torch.Tensor, config: Liu2021Config, block: int,
                  block_input: torch.Tensor, batch_size: int, search_intervals: Callable[..., dict],
                  label: str = "interval search") -> Callable[..., dict]:
    """The interval search (`liu2021.search_intervals`) of one module's ops, reading their inputs from its
    block's cached input."""
    return partial(search_intervals, config=config, label=label, status_lines=False,
                   inputs_of=BlockInputs(qmodel, images, batch_size, known=(block, block_input)))


def module_error(qmodel: torch.nn.Module, module: str, images: torch.Tensor, block_input: torch.Tensor,
                 float_y: torch.Tensor, search: Callable[..., dict], batch_size: int,
                 output: str = "module") -> float:
    """||Ŷ - Y||^2 per image with only `module` quantized (its intervals from `search`).

    Leaves qmodel as it found it (every quantizer off, the module's biases and intervals
    restored), so that the next module is measured with only itself quantized: the
    search's bias correction would otherwise shift every later module's input.
    """
    owner = qmodel.get_submodule(module)
    saved = {k: v.detach().clone() for k, v in owner.state_dict().items()}
    try:
        search(qmodel, images, only=[n for n, _ in vit.quant_ops(qmodel) if n.startswith(module + ".")])
        y = _module_output(qmodel, module, block_input, batch_size, output)
        return float((y - float_y).pow(2).sum()) / len(images)
    finally:
        vit.set_enabled(qmodel, False)
        owner.load_state_dict(saved)


def at_width(liu_factory: Callable[[BitsFor], vit.QuantizerFactory], config: Liu2021Config,
             modules: list[str], b: int) -> vit.QuantizerFactory:
    """The quantizers of a model with every MSA / MLP module at width `b` (its weights alone with
    mp_widths="weights"), the stem and head at their own widths, as the build will have them: the
    calibration forward runs quantized weights, so a b-bit stem would move every range it calibrates
    (and the intervals searched from them) away from the build's."""
    return liu_factory(layer_bits(config, dict.fromkeys(modules, b), weights_only=config.mp_widths == "weights"))


def quantized_context_errors(model: torch.nn.Module, x: torch.Tensor, quick: Liu2021Config,
                             liu_factory: Callable[[BitsFor], vit.QuantizerFactory],
                             search_intervals: Callable[..., dict], candidates: list[int], float_out: torch.Tensor,
                             batch_size: int) -> dict[str, dict[int, float]]:
    """||Ŷ - Y||^2 per image of the model's output, Ŷ with one module at width b and every other module at
    N bits (`quick.bits`), Y the float model's output (`float_out`).

    Measured against the float model (the other variants), a module's error is what it does alone; at
    6 bits on the real model the others already cost liu2021 25 points, and errors on top of theirs
    are what a width changes. The context is the uniform N-bit model, its intervals searched once (as
    the recipe, with `quick`'s candidates); each candidate module is swapped into it, searched on its
    block's quantized input, and the model runs from that block on.
    """
    n_bits, _ = parse_bits(quick.bits)
    modules = module_names(model)
    context = vit.quantize_vit(model, at_width(liu_factory, quick, modules, n_bits))
    vit.calibrate_activations(context, batches(x, batch_size))
    search_intervals(context, x, quick, label="mixed-precision context", status_lines=False)
    walk = BlockInputs(context, x, batch_size)
    block_inputs = [walk.block_input(i) for i in range(len(context.blocks))]

    def error(module: str) -> float:  # the model's output error, run from the module's block
        y = _module_output(context, module, block_inputs[_block_of(module)], batch_size, "model")
        return float((y - float_out).pow(2).sum()) / len(x)

    # Every module at N bits: the same model whichever module is asked. A module swapped in at N and
    # searched in place gives exactly this error, the two models being built alike (at_width); at b != N
    # its ranges start from a calibration with the modules before it at b too.
    at_n = error(modules[0])
    errors: dict[str, dict[int, float]] = {m: {n_bits: at_n} for m in modules}
    others = [b for b in candidates if b != n_bits]
    clock = StageClock("mixed-precision sensitivities (in the N-bit model)", len(others))
    for b in progress(others, "mixed-precision sensitivities", unit="width", log=False):
        clock.begin(f"{b} bits")
        qmodel = vit.quantize_vit(model, at_width(liu_factory, quick, modules, b))
        vit.calibrate_activations(qmodel, batches(x, batch_size))
        for m in modules:
            i, kind = _block_of(m), m.rsplit(".", 1)[1]
            block, original = context.blocks[i], context.get_submodule(m)
            setattr(block, kind, copy.deepcopy(qmodel.get_submodule(m)))  # its b-bit quantizers, calibrated
            ops = [n for n, _ in vit.quant_ops(context) if n.startswith(m + ".")]
            try:
                search_intervals(context, x, quick, only=ops, label=f"{m} @ {b} bits", status_lines=False,
                                 inputs_of=BlockInputs(context, x, batch_size, known=(i, block_inputs[i])))
                errors[m][b] = error(m)
            finally:
                setattr(block, kind, original)
    return errors


def nuclear_norm(y: torch.Tensor) -> float:
    """Mean nuclear norm of the per-sample matrices (last two dims: [N, N] per head or [N, C]); the
    model's output [images, classes] is one matrix, the same factor for every module."""
    return float(torch.linalg.matrix_norm(y.double(), ord="nuc").mean())


def normalise_per_kind(omegas: dict[str, dict[int, float]], n_bits: int) -> dict[str, dict[int, float]]:
    """Each module's sensitivities over the mean of its kind's (attn or mlp) at N bits.

    The paper measures an MSA module on its attention map and an MLP module on its output
    feature: quantities of unrelated scale, so in a raw sum one kind takes every low width.
    """
    out = {}
    for kind in ("attn", "mlp"):
        members = [m for m in omegas if m.endswith(kind)]
        if not members:
            continue
        mean = sum(omegas[m][n_bits] for m in members) / len(members)
        for m in members:
            out[m] = {b: v / mean if mean > 0 else v for b, v in omegas[m].items()}
    return out


def pareto_choice(costs: dict[str, int], omegas: dict[str, dict[int, float]], budget: int) -> dict[str, int]:
    """Bits per module minimising sum(Omega) subject to sum(params * bits) <= budget (exact)."""
    front: list[tuple[int, float, dict[str, int]]] = [(0, 0.0, {})]
    for module, per_bits in omegas.items():
        grown = [(c + costs[module] * b, o + om, {**ch, module: b})
                 for c, o, ch in front for b, om in per_bits.items() if c + costs[module] * b <= budget]
        grown.sort(key=lambda t: (t[0], t[1]))
        front = []
        for entry in grown:  # keep only states no cheaper state beats
            if not front or entry[1] < front[-1][1]:
                front.append(entry)
    if not front:
        raise ValueError("no bit assignment fits the budget")
    return min(front, key=lambda t: t[1])[2]


def choose_bits(model: torch.nn.Module, images: torch.Tensor, config: Liu2021Config,
                liu_factory: Callable[[BitsFor], vit.QuantizerFactory],
                search_intervals: Callable[..., dict]) -> tuple[dict[str, int], dict]:
    """Each MSA / MLP module's width. The recipe's own quantizers (`liu_factory`) and interval search
    (`search_intervals`) come from liu2021.py, which calls this."""
    n_bits, _ = parse_bits(config.bits)
    # The paper's {N-2 .. N+2}, within what the integer kernels run (8-bit codes): a wider layer would
    # leave the program in float.
    candidates = [b for b in range(n_bits - 2, n_bits + 3) if 3 <= b <= arith.MAX_CODE_BITS]
    modules = module_names(model)
    x = images[: config.mp_search_images]
    quick = replace(config, candidates=config.mp_candidates, bits=f"W{n_bits}A{n_bits}")
    batch = config.batch_size * 4
    reference = vit.quantize_vit(model, at_width(liu_factory, config, modules, n_bits))
    vit.set_enabled(reference, False)
    # Every block's float input, once: each sensitivity then starts at its module's block (with the
    # default mp_output it runs that block alone: 24x less work on a 12-block ViT; the same values).
    block_inputs = float_block_inputs(reference, x, batch)
    in_context = config.mp_output == "quantized-model"
    output = "model" if in_context else config.mp_output
    if output == "model":  # one quantity for every module: the float model's output, computed once
        y = _module_output(reference, modules[0], block_inputs[0], batch, output)
        float_y, y_norm = dict.fromkeys(modules, y), dict.fromkeys(modules, nuclear_norm(y))
    else:
        float_y = {m: _module_output(reference, m, block_inputs[_block_of(m)], batch, output) for m in modules}
        y_norm = {m: nuclear_norm(y) for m, y in float_y.items()}
    if in_context:
        errors = quantized_context_errors(model, x, quick, liu_factory, search_intervals, candidates,
                                          float_y[modules[0]], batch)
        omegas = {m: {b: y_norm[m] * e for b, e in per_bits.items()} for m, per_bits in errors.items()}
    else:
        omegas = {m: {} for m in modules}
        clock = StageClock("mixed-precision sensitivities", len(candidates))
        for b in progress(candidates, "mixed-precision sensitivities", unit="width", log=False):
            clock.begin(f"{b} bits")
            qmodel = vit.quantize_vit(model, at_width(liu_factory, config, modules, b))
            vit.calibrate_activations(qmodel, batches(x, batch))
            vit.set_enabled(qmodel, False)
            for m in modules:
                i = _block_of(m)
                search = module_search(qmodel, x, quick, i, block_inputs[i], batch, search_intervals,
                                       label=f"{m} @ {b} bits")
                err = module_error(qmodel, m, x, block_inputs[i], float_y[m], search, batch, output)
                omegas[m][b] = y_norm[m] * err
    sizes = vit.weight_bits(reference)
    costs = {m: sum(n for op, (n, _) in sizes.items() if op.startswith(m + ".")) for m in modules}
    budget = sum(costs.values()) * n_bits
    if config.mp_normalise == "kind":
        omegas = normalise_per_kind(omegas, n_bits)
    chosen = pareto_choice(costs, omegas, budget)
    used = sum(costs[m] * b for m, b in chosen.items())
    details = {"budget_bits": budget, "used_bits": used, "candidates": candidates, "widths": config.mp_widths,
               "bits": chosen,
               "sensitivity": {m: {str(b): v for b, v in om.items()} for m, om in omegas.items()}}
    return chosen, details
