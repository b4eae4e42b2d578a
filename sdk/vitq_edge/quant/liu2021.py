"""Liu et al., "Post-Training Quantization for Vision Transformer" (NeurIPS 2021).

Every weight and every input of a linear layer or matmul gets one symmetric interval
(per layer, per tensor). For each op in forward order, on the inputs the already
quantized prefix of the model produces:

1. similarity-aware search: the weight interval d_W and the input interval d_X (for a
   matmul, the intervals of both operands) alternately take the best of `candidates`
   values in [alpha * d0, beta * d0] (d0 from the max; alpha_8bit instead of alpha for an
   8-bit quantizer, Liu2021Config says why), maximising the mean Pearson
   correlation between the float output O and the quantized output Ô; up to `rounds`
   rounds, stopping when neither changes;
2. ranking-aware loss on the attention scores (the q @ k^T op): the objective becomes
   Pearson - gamma * L_rank (`losses.ranking_loss`);
3. bias correction after each round: E[Ô - O] per output unit is subtracted from the bias.

With `bits="mixed:N"` the bit width of every MSA and MLP module is chosen first by
`mixed_precision.choose_bits` (nuclear-norm sensitivity under the size budget of N bits).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from vitq_edge.progress import StageClock, progress
from vitq_edge.quant import vit
from vitq_edge.quant.arith import fake_uniform
from vitq_edge.quant.calibration import BlockInputs, batches, package, resolve_device, stack_calibration
from vitq_edge.quant.losses import PearsonTarget, RankingTarget
from vitq_edge.quant.mixed_precision import choose_bits
from vitq_edge.quant.quantizers import Quantizer, UniformQuantizer
from vitq_edge.quant.registry import QuantizedModel, register_recipe
from vitq_edge.recipes import BitsFor, Liu2021Config, layer_bits


def liu_factory(bits_for: BitsFor):
    """Symmetric per-tensor intervals for weights and inputs (unsigned for the softmax output)."""

    def make(op: str, role: str) -> Quantizer:
        w_bits, a_bits = bits_for(op)
        if role == "weight":
            return UniformQuantizer(w_bits, signed=True, granularity="tensor", init="minmax")
        if op.endswith(".av") and role == "a":  # probabilities are >= 0: zero point 0, all codes positive
            return UniformQuantizer(a_bits, signed=False, granularity="tensor", init="minmax")
        return UniformQuantizer(a_bits, signed=True, granularity="tensor", init="minmax")

    return make


def _compute(op: torch.nn.Module, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The op's arithmetic on already-quantized operands (input/weight or a/b); convolutions as patch GEMMs."""
    if isinstance(op, vit.QuantLinear | vit.QuantConv2d):
        return F.linear(a, b, bias)
    return a @ b


def _rows(n: int, keep: int, seed: int) -> torch.Tensor | None:
    """`keep` of n row indices (fixed seed, sorted), or None to keep them all."""
    if keep <= 0 or keep >= n:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:keep].sort().values


def search_operands(op: torch.nn.Module, inputs: tuple[torch.Tensor, ...], tokens: int,
                    seed: int = 0) -> list[torch.Tensor]:
    """The two operands the search quantizes, on `tokens` token positions (query rows) per image.

    Each candidate interval costs one product of the op; the Pearson correlation and the
    ranking loss are means over output rows, so a fixed random subset of rows estimates
    them at a fraction of the cost (the intervals themselves are per tensor, and their
    starting points come from the whole calibration set). tokens = 0 keeps every row, as
    the paper does.
    """
    if isinstance(op, vit.QuantMatMul):  # [B, H, T, *] @ [B, H, *, *]: sample the query rows of a
        a, b = inputs
        idx = _rows(a.shape[-2], tokens, seed)
        return [a if idx is None else a[..., idx, :], b]
    x, w = inputs[0], op.weight.detach()
    if isinstance(op, vit.QuantConv2d):  # the patch convolution as the GEMM it is (stride = kernel)
        x, w = vit.patchify(x, w.shape[-1]), w.reshape(w.shape[0], -1)
    if x.dim() == 3:
        idx = _rows(x.shape[1], tokens, seed)
        x = x if idx is None else x[:, idx]
    return [x, w]


def _best(score: Callable[[int], float], n: int, coarse: bool) -> tuple[int, float]:
    """The candidate index with the highest score: all n, or a coarse pass then its neighbourhood.

    Coarse-to-fine scores every step-th candidate (step ~ sqrt(n)), then every candidate
    within a step of the best of those: ~3 sqrt(n) products instead of n, the same pick
    where the objective is unimodal over the grid.
    """
    scores: dict[int, float] = {}

    def at(i: int) -> float:
        if i not in scores:
            scores[i] = score(i)
        return scores[i]

    if not coarse or n <= 16:
        candidates = range(n)
    else:
        step = max(2, round(n ** 0.5))
        first = max(sorted(set(range(0, n, step)) | {n - 1}), key=at)
        candidates = range(max(0, first - step + 1), min(n, first + step))
    pick = max(candidates, key=at)
    return pick, scores[pick]


class IntervalSearch:
    """The alternating Pearson search of one op's two intervals, with bias correction."""

    def __init__(self, op: torch.nn.Module, inputs: tuple[torch.Tensor, ...], config: Liu2021Config,
                 score_scale: float | None = None) -> None:
        self.op, self.config, self.score_scale = op, config, score_scale
        self.values = search_operands(op, inputs, config.search_tokens, config.seed)
        self.quantizers: list[UniformQuantizer] = list(op.operands())
        self.bias = getattr(op, "bias", None)
        self.reference = _compute(op, *self.values, self.bias)  # float output, original bias
        self.similarity = PearsonTarget(self.reference)
        self.ranking = None
        if score_scale is not None and config.ranking:
            self.ranking = RankingTarget(self.reference * score_scale, config.theta, config.ranking_pairs)

    def _quantized(self, j: int, scale: torch.Tensor) -> torch.Tensor:
        q = self.quantizers[j]
        qmin, qmax = q.qrange
        return fake_uniform(self.values[j], scale, q.zero_point, qmin, qmax)

    def objective(self, out: torch.Tensor) -> float:
        score = self.similarity(out)
        if self.ranking is not None:
            score = score - self.config.gamma * self.ranking(out * self.score_scale)
        return float(score)

    def run(self) -> dict:
        cfg = self.config
        d0 = [q.scale.detach().clone() for q in self.quantizers]
        grids = [torch.linspace(cfg.alpha_for(q.bits), cfg.beta, cfg.candidates, device=d.device) * d
                 for q, d in zip(self.quantizers, d0, strict=True)]
        current = [int(torch.argmin((g - d).abs())) for g, d in zip(grids, d0, strict=True)]
        fixed = [self._quantized(j, grids[j][current[j]]) for j in (0, 1)]
        rounds_run = 0
        best = None
        for _ in range(cfg.rounds):
            rounds_run += 1
            changed = False
            for j in (1, 0):  # weight (or b) first with the input fixed, then the input
                def score(c: int, j: int = j) -> float:
                    qj = self._quantized(j, grids[j][c])
                    operands = (qj, fixed[1]) if j == 0 else (fixed[0], qj)
                    return self.objective(_compute(self.op, *operands, self.bias))

                pick, best = _best(score, cfg.candidates, cfg.search == "coarse-to-fine")
                if pick != current[j]:
                    changed, current[j] = True, pick
                    fixed[j] = self._quantized(j, grids[j][pick])
            if cfg.bias_correction and self.bias is not None:
                out = _compute(self.op, *fixed, self.bias)
                self.bias -= (out - self.reference).mean(list(range(out.dim() - 1)))
                best = self.objective(_compute(self.op, *fixed, self.bias))
            if not changed:
                break
        for j in (0, 1):
            self.quantizers[j].scale.data.fill_(float(grids[j][current[j]]))
        return {"rounds": rounds_run, "objective": round(best, 6) if best is not None else None,
                "scales": [float(grids[j][current[j]]) for j in (0, 1)]}


def _attention_scale(model: torch.nn.Module, op_name: str) -> float | None:
    if not op_name.endswith(".qk"):
        return None
    return model.get_submodule(op_name.rsplit(".", 1)[0]).scale


def search_intervals(qmodel: torch.nn.Module, images: torch.Tensor, config: Liu2021Config,
                     only: Iterable[str] | None = None, label: str = "interval search",
                     status_lines: bool = True, inputs_of: BlockInputs | None = None) -> dict:
    """Run the search op by op in forward order; ops not yet searched stay float meanwhile.

    Status lines per op unless `status_lines` is False (a caller that writes its own).

    `inputs_of`: where the ops' inputs come from, when the caller holds a block's input already.
    """
    ops = [(n, op) for n, op in vit.quant_ops(qmodel) if only is None or n in set(only)]
    for _, op in ops:
        for q in op.operands():
            q.enabled = False
    inputs_of = inputs_of or BlockInputs(qmodel, images, config.batch_size * 4)
    log = {}
    clock = StageClock(label, len(ops)) if status_lines else None
    for name, op in progress(ops, label, unit="op", log=False):
        if clock:
            clock.begin(name)
        inputs = inputs_of.of(name, op)
        if isinstance(op, vit.QuantMatMul):
            for q, x in zip(op.operands(), inputs, strict=True):
                q.init_range(x)
        for q in op.operands():
            q.enabled = True
        log[name] = IntervalSearch(op, inputs, config, _attention_scale(qmodel, name)).run()
    return log


@register_recipe(Liu2021Config)
def quantize_liu2021(model: torch.nn.Module, config: Liu2021Config, calib: Iterable[torch.Tensor],
                     example_inputs: tuple) -> QuantizedModel:
    device = resolve_device(config.device)
    x = stack_calibration(calib)
    details: dict = {}
    module_bits = None
    if config.mixed:
        module_bits, details["mixed_precision"] = choose_bits(model, x, config, liu_factory, search_intervals)
    bits_for = layer_bits(config, module_bits, weights_only=config.mp_widths == "weights")
    qmodel = vit.quantize_vit(model, liu_factory(bits_for)).to(device)
    vit.calibrate_activations(qmodel, (b.to(device) for b in batches(x, config.batch_size * 4)))
    search_images = x[: config.search_images].to(device)
    details["search"] = search_intervals(qmodel, search_images, config)
    return package(qmodel, config, details)
