"""Recipes as config objects: what each recipe is, which widths it takes, its options.

Like torchao's `quantize_(model, config)`: a config is a small frozen dataclass that
says *what*; a handler registered for its type (`quant/registry.py`, filled by the
recipe modules) says *how*. This module imports no torch, so the CLI validates
--recipe, --bits and --option at once; it only turns flags into a config
(`recipe_config`).

    from vitq_edge.quant import quantize, XnnpackInt8Config
    qm = quantize(model, XnnpackInt8Config(), calib_batches, example_input)
    qm.module(x)            # the simulated model: what the device computes
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import ClassVar, Literal, get_args, get_origin, get_type_hints

from vitq_edge.errors import VitqError

UNIFORM_BITS = ("W8A8", "W6A6", "W4A4")
MIXED_MIN_BITS, MIXED_MAX_BITS = 4, 8  # liu2021 mixed:N size budgets
HEAD_OP = "head"  # the classifier head's name in a timm ViT (and in the quantized model)
STEM_OP = "patch_embed.proj"  # the patch embedding's convolution, the first quantized op

BitsFor = Callable[[str], tuple[int, int]]  # op name -> (weight bits, input bits)


def parse_bits(bits: str) -> tuple[int, int]:
    """'W4A8' -> (4, 8); 'mixed:6' -> (6, 6), the budget's uniform width."""
    m = re.fullmatch(r"W(\d+)A(\d+)", bits) or re.fullmatch(r"mixed:(\d+)()", bits)
    if not m:
        raise VitqError(f"cannot read --bits '{bits}': use W8A8, W6A6, W4A4 or mixed:N")
    w = int(m.group(1))
    return w, int(m.group(2) or w)


@dataclass(frozen=True)
class RecipeConfig:
    """Base of every recipe config. `bits` None means the recipe's first supported width."""

    name: ClassVar[str] = "base"
    summary: ClassVar[str] = ""  # one phrase for --help
    supported_bits: ClassVar[tuple[str, ...]] = ()
    bits: str | None = None

    def __post_init__(self) -> None:
        if self.bits is None:
            object.__setattr__(self, "bits", self.supported_bits[0])
        elif not self.bits_supported(self.bits):
            raise VitqError(f"recipe {self.name} supports --bits {self.bits_choices()}, not '{self.bits}'")
        for name, hint in get_type_hints(type(self)).items():  # a Literal field takes only its listed values
            allowed = get_args(hint) if get_origin(hint) is Literal else ()
            if allowed and getattr(self, name) not in allowed:
                raise VitqError(f"recipe {self.name} option {name}={getattr(self, name)!r}: use "
                                f"{' or '.join(map(str, allowed))}")

    @classmethod
    def bits_supported(cls, bits: str) -> bool:
        return bits in cls.supported_bits

    @classmethod
    def bits_choices(cls) -> str:
        """The --bits values this recipe takes, for messages and --help."""
        return ", ".join(cls.supported_bits)


@dataclass(frozen=True)
class Fp32Config(RecipeConfig):
    """No quantization: the float model lowered to XNNPACK's fp32 kernels."""

    name: ClassVar[str] = "fp32"
    summary: ClassVar[str] = "none: the float model on XNNPACK"
    supported_bits: ClassVar[tuple[str, ...]] = ("fp32",)


@dataclass(frozen=True)
class XnnpackInt8Config(RecipeConfig):
    """ExecuTorch's stock PT2E flow: XNNPACKQuantizer, symmetric int8, static activations.

    Weights per output channel (`per_channel=True`) or per tensor. This is what an
    ExecuTorch user gets out of the box: the baseline the paper recipes must beat.
    """

    name: ClassVar[str] = "xnnpack-int8"
    summary: ClassVar[str] = "ExecuTorch's stock PT2E int8"
    supported_bits: ClassVar[tuple[str, ...]] = ("W8A8",)
    per_channel: bool = True


@dataclass(frozen=True)
class PaperRecipeConfig(RecipeConfig):
    """Shared by the paper recipes: where calibration runs and how big its batches are."""

    supported_bits: ClassVar[tuple[str, ...]] = UNIFORM_BITS
    device: str = "cpu"  # "cuda" where a GPU exists: calibration runs there, the result comes back to CPU
    batch_size: int = 32
    seed: int = 0
    # The first and last ops' weight and input widths (the patch embedding, the classifier head); None: --bits,
    # as the papers quantize them. 8 by default, the "first/last layer at 8 bits" custom (BRECQ, QDrop; a switch
    # in the ADFQ-ViT code). Each alone, the rest of the real model float, at 4 bits: a 4-bit head costs 9 to 12
    # points of validation accuracy (docs/validation/head-bits.md), a 4-bit stem 13 to 14 points with minmax's and
    # adfq's ranges and 53 with liu2021's (docs/validation/stem-bits.md); together they hold 1% of ViT-S's weights.
    stem_bits: int | None = 8
    head_bits: int | None = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise VitqError(f"unknown --calib-device '{self.device}': use cpu or cuda[:N]")
        for name in ("stem_bits", "head_bits"):
            value = getattr(self, name)
            if value is not None and not MIXED_MIN_BITS <= value <= MIXED_MAX_BITS:
                raise VitqError(f"recipe {self.name} option {name}={value}: use {MIXED_MIN_BITS} to "
                                f"{MIXED_MAX_BITS}, or none for the --bits width")


def layer_bits(config: PaperRecipeConfig, module_bits: dict[str, int] | None = None,
               weights_only: bool = False) -> BitsFor:
    """Each quantized op's (weight, input) bits: the width of --bits, a mixed-precision module's own
    width (`module_bits`, e.g. {"blocks.3.attn": 5}) for the ops inside it (its weights alone with
    `weights_only`: the inputs keep --bits), `stem_bits` for the patch embedding and `head_bits` for
    the head."""
    uniform = parse_bits(config.bits)
    module_bits = module_bits or {}
    ends = {STEM_OP: config.stem_bits, HEAD_OP: config.head_bits}

    def bits_for(op: str) -> tuple[int, int]:
        if ends.get(op) is not None:
            return ends[op], ends[op]
        b = module_bits.get(op.rsplit(".", 1)[0])  # blocks.3.attn.qkv -> blocks.3.attn
        return uniform if b is None else (b, uniform[1] if weights_only else b)

    return bits_for


@dataclass(frozen=True)
class MinMaxConfig(PaperRecipeConfig):
    """The naive baseline: per-channel symmetric weights, per-tensor asymmetric activations,
    ranges = observed min/max on the calibration set. Softmax, LayerNorm, GELU stay float."""

    name: ClassVar[str] = "minmax"
    summary: ClassVar[str] = "naive min/max ranges, the baseline"


@dataclass(frozen=True)
class Liu2021Config(PaperRecipeConfig):
    """Liu et al., NeurIPS 2021 (`quant/liu2021.py`): symmetric per-layer intervals searched to
    maximise the Pearson correlation of each layer's output (alternating weight / input, up to
    `rounds` rounds over `candidates` intervals in [alpha, beta] x the max, [alpha_8bit, beta] for
    8-bit quantizers), ranking loss on the attention scores, bias correction; `bits="mixed:N"` adds
    nuclear-norm mixed precision under the size budget of uniform N-bit weights."""

    name: ClassVar[str] = "liu2021"
    summary: ClassVar[str] = "Liu et al. 2021: Pearson interval search, ranking loss, bias correction, mixed precision"
    alpha: float = 0.5  # the paper's lowest interval, x the max, for quantizers narrower than 8 bits
    # Ours: for 8-bit (and wider) quantizers the search starts at alpha_8bit x the max. On the real model's
    # validation split the paper's clipping costs 6.4 points at W8A8 (liu-w8-alpha05 70.50% vs liu-w8-alpha1
    # 76.90%) and is worth 28 at W6A6 (liu-w6-alpha1 27.00% vs 55.20%); W6A6 with this rule, its 8-bit stem
    # and head unclipped: 57.70% (liu-w6-alpha8bit). alpha_8bit=0.5 gives the paper's search.
    alpha_8bit: float = 1.0
    beta: float = 1.2
    candidates: int = 100  # not stated in the paper
    rounds: int = 20
    gamma: float = 0.1  # ranking-loss weight
    theta: float = 0.2  # ranking-loss margin
    ranking: bool = True
    bias_correction: bool = True
    search_images: int = 128  # calibration images used by the interval search
    # Cost knobs (liu2021.py says why they keep the result): token positions per image the search scores
    # (0: all, the paper), every candidate or a coarse pass and its neighbourhood ("grid": the paper), and
    # key pairs per row of the ranking loss.
    search_tokens: int = 16
    search: Literal["coarse-to-fine", "grid"] = "coarse-to-fine"
    ranking_pairs: int = 1024
    mp_search_images: int = 128  # images for the mixed-precision sensitivities
    mp_candidates: int = 25  # intervals per search when measuring sensitivities
    mp_normalise: Literal["none", "kind"] = "none"  # "kind": sensitivities over their module kind's mean
    # Y of the sensitivities: attention map / MLP output (the paper), the block's output, the model's, or the
    # model's with every other module at N bits instead of float ("quantized-model").
    mp_output: Literal["module", "block", "model", "quantized-model"] = "module"
    # What a module's width sets: its weights and its ops' inputs (the paper), or its weights alone, the
    # inputs staying at N bits ("weights"): the budget counts weights only, and narrow inputs are what
    # collapses on outlier-heavy activations (this recipe's W4A4 on the real model).
    mp_widths: Literal["weights+inputs", "weights"] = "weights+inputs"

    @classmethod
    def bits_supported(cls, bits: str) -> bool:
        if bits in cls.supported_bits:
            return True
        m = re.fullmatch(r"mixed:(\d+)", bits)
        return bool(m) and MIXED_MIN_BITS <= int(m.group(1)) <= MIXED_MAX_BITS

    @classmethod
    def bits_choices(cls) -> str:
        return f"{', '.join(cls.supported_bits)} or mixed:N (N from {MIXED_MIN_BITS} to {MIXED_MAX_BITS})"

    @property
    def mixed(self) -> bool:
        return self.bits.startswith("mixed:")

    def alpha_for(self, bits: int) -> float:
        """The lower end of the interval grid, x the max, for a quantizer of `bits` bits."""
        return self.alpha_8bit if bits >= 8 else self.alpha


@dataclass(frozen=True)
class AdfqConfig(PaperRecipeConfig):
    """ADFQ-ViT (`quant/adfq.py`): PPOQ on post-LayerNorm inputs, Shift-Log2 on post-GELU,
    log-sqrt2 on post-softmax, then attention-score enhanced module-wise reconstruction
    (AdaRound weights, learned activation scales, QDrop input mixing, KL on attention maps)."""

    name: ClassVar[str] = "adfq"
    summary: ClassVar[str] = "ADFQ-ViT: PPOQ, Shift-Log2, module-wise reconstruction"
    # The schedule, per unit (adfq.default_schedule fills what is None). The paper's: 3000 iterations (the
    # ADFQ-ViT README command; code default 5000) of 32 images, used on a GPU, with --iters, or where it fits
    # the CPU work budget; larger models on a CPU get 8 images per iteration and as many iterations as the
    # budget buys (under an hour on 2 cores; 600 for a 224-px ViT-S).
    iters: int | None = None
    batch_size: int | None = None
    # weight_lr and act_lr are the paper's for 3000 iterations; with fewer, both are multiplied by
    # 3000 / iters (at most 15) so that Adam's total step length stays the paper's (adfq.lr_factor).
    scale_lr: bool = True
    qkv_threshold: float = 5.0  # PPOQ outlier magnitude, qkv input (code: 5)
    # PPOQ outlier magnitude, fc1 input (adfq.fc1_threshold): None = the code's two values by width, 5 (its
    # `--outlier 5`) at 4 activation bits and below, 10 (the README command's) above.
    fc1_threshold: float | None = None
    # Log quantizers' steps per octave (adfq.log_steps_per_octave): "auto" = per role, post-GELU 2^(bits-3)
    # (log-sqrt2, the code's choice, at 4 bits; ~8 octaves at every width), probabilities 2^(bits-4) (~16
    # octaves: a 257-token softmax needs the range); "sqrt2" or "2" (the paper's text) for both.
    log_base: Literal["auto", "sqrt2", "2"] = "auto"
    # The fc2 input's quantizer (adfq.gelu_quantizer): "auto" = Shift-Log2 below 8 bits, uniform at 8 and
    # above; "shift-log2" (the paper's, at every width) or "uniform" (asymmetric, per tensor).
    gelu_quantizer: Literal["auto", "shift-log2", "uniform"] = "auto"
    # Shift-Log2's top level: "max" (the observed maximum: no value clips) or "mse" (the code's: the 99.999%
    # quantile, shrunk by an MSE search, which clips the real model's rare large post-GELU values). Chosen on the
    # real model's validation split before reconstruction (tools/quantizer_ablation.py --groups fc2, 512 images,
    # docs/ablation/adfq-W{4A4,6A6}-*fc2.md), every quantizer on: W6A6 65.62% -> 73.83% top-1 (float 78.71%),
    # W4A4 36.52% -> 41.60%; a uniform fc2 input at W6A6 instead: 59.38%. After reconstruction (the default
    # W4A4 build, 1,000 validation images) the two tie within noise (~1.4 points): max 67.40% top-1, 73.60%
    # agreement, 7.06 dB; mse 67.50%, 75.00%, 7.04 dB; on the integer log softmax 68.00 / 73.70 / 7.14 and
    # 68.50 / 74.80 / 7.25 (docs/validation/adfq-w4-gelu-{max,mse}.md, integer-log-softmax-adfq-W4A4*.md).
    # max stays: it won clearly at W6A6 before reconstruction, and nothing measured after it prefers mse
    # beyond the noise.
    gelu_init: Literal["mse", "max"] = "max"
    # Range of the per-tensor uniform activation quantizers (q, k, v, proj / patch / head inputs, a uniform
    # fc2 input) before reconstruction (adfq.uniform_init): "auto" = the MSE search below 8 bits, min/max at
    # 8 and above; "mse" (the code's, at every width) or "minmax".
    uniform_init: Literal["auto", "mse", "minmax"] = "auto"
    # Range of each weight row before AdaRound: "mse" (the code's search, which may clip a row's largest
    # weights) or "minmax" (the row's extremes). Measured at W8A8 on the real model's validation split, where
    # clipping cost the uniform activations accuracy (uniform_init): weights alone, before reconstruction,
    # 97.27% agreement / 28.59 dB with minmax against 97.27% / 28.61 dB with mse (docs/ablation/
    # adfq-W8A8-weight_init-minmax-weights.md, adfq-W8A8-shift-log2-mse.md): no difference, the code's stays.
    weight_init: Literal["mse", "minmax"] = "mse"
    weight_lr: float = 3e-3  # AdaRound variables (Adam)
    act_lr: float = 4e-5  # activation scales (Adam, cosine decay)
    round_weight: float = 0.01  # lambda of the AdaRound regularizer
    kl_weight: float = 10.0  # 1 / lamb_r in the code
    temperature: float = 4.0
    # The KL's softmax axis: the code softmaxes attention maps over heads; "keys" follows the paper's text.
    kl_dim: Literal["heads", "keys"] = "heads"
    drop_prob: float = 0.5  # QDrop: chance an element takes the float input
    # Two departures the oracle check found, each decided on the validation split (adfq.py says how):
    # activation ranges unit by unit from the inputs the model quantized so far produces ("sequential",
    # the ADFQ-ViT code) or from the float model, all at once ("float", ours before); PPOQ and Shift-Log2
    # rounding with a straight-through gradient to their inputs and scales ("ste", ours) or none (the
    # code: scales learn only through the dequantization).
    act_calibration: Literal["float", "sequential"] = "sequential"
    round_gradient: Literal["ste", "none"] = "ste"
    # Scales of the q, k, v quantizers (the attention products' uniform inputs) during reconstruction:
    # "fixed" at their calibrated range (the ADFQ-ViT code, which has their learning commented out) or
    # "learned" with the other activation scales (act_lr). At W4A4 they are the real model's largest single
    # loss before reconstruction (docs/ablation/adfq-W4A4-post-LN-q.md), but learning them does not pay: the
    # default build on 1,000 validation images gives 68.40% top-1 / 76.30% agreement / 7.39 dB against
    # 70.70 / 77.50 / 7.31 fixed, and calibrates for 3,421 s against 2,876 (the fixed program's test-row
    # build; docs/validation/adfq-w4-matmul-learned.md, adfq-w4-fc1-5.md). fixed stays.
    matmul_scales: Literal["fixed", "learned"] = "fixed"


RECIPES: dict[str, type[RecipeConfig]] = {
    c.name: c for c in (Fp32Config, XnnpackInt8Config, MinMaxConfig, Liu2021Config, AdfqConfig)
}
# The recipes that calibrate with our own quantizers (and run on --calib-device).
PAPER_RECIPES = tuple(name for name, cls in RECIPES.items() if issubclass(cls, PaperRecipeConfig))


def recipe_config(name: str, bits: str | None = None, **options) -> RecipeConfig:
    """The config for a recipe name as typed on the command line; `options` set its fields."""
    if name not in RECIPES:
        raise VitqError(f"unknown recipe '{name}': choose one of {', '.join(RECIPES)}")
    cls = RECIPES[name]
    known = {f.name: f for f in fields(cls) if f.name != "bits"}
    for key, value in options.items():
        if key not in known:
            raise VitqError(f"recipe {name} has no option '{key}'; it has {', '.join(known) or 'none'}")
        options[key] = _coerce(name, key, value, known[key].default, get_type_hints(cls)[key])
    return cls(bits=bits, **options)


def recipe_option_names(name: str) -> set[str]:
    return {f.name for f in fields(RECIPES[name]) if f.name != "bits"} if name in RECIPES else set()


def options_for_recipe(options: dict, name: str) -> dict:
    """The entries of `options` (--option KEY=VALUE, shared by several recipes) that recipe `name` has."""
    names = recipe_option_names(name)
    return {k: v for k, v in options.items() if k in names}


def _coerce(recipe: str, key: str, value: object, default: object, hint: object = None) -> object:
    """`value` (e.g. text from --option) as the field's type (its default's, or X of `X | None`), or a VitqError."""
    optional = type(None) in get_args(hint)
    kind = next(t for t in get_args(hint) if t is not type(None)) if optional else type(default)
    if value is None and optional:
        return None
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    text = str(value).strip()
    if optional and text.lower() in ("", "none", "default"):
        return None
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        return kind(text) if kind in (int, float, str) else value
    except ValueError:
        raise VitqError(f"recipe {recipe} option {key}={text!r}: expected {kind.__name__} "
                        f"(default {default!r})") from None


def parse_options(pairs: Iterable[str]) -> dict[str, str]:
    """['search_tokens=0', 'search=grid'] -> {'search_tokens': '0', 'search': 'grid'} (typed by recipe_config)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip().isidentifier():
            raise VitqError(f"bad --option '{pair}': write KEY=VALUE, e.g. --option search_tokens=0")
        options[key.strip()] = value.strip()
    return options


def parse_program(spec: str) -> tuple[str, str, str]:
    """A `compare` program: 'minmax@W8A8' -> ('minmax@W8A8', 'minmax', 'W8A8'); 'fp32' -> ('fp32', 'fp32', 'fp32').

    The first item names the row: the recipe alone where it has one width. Checked against
    the recipe registry, so a typo fails before any work.
    """
    recipe, _, bits = spec.strip().partition("@")
    config = recipe_config(recipe, bits or None)
    key = recipe if len(config.supported_bits) == 1 and not bits else f"{recipe}@{config.bits}"
    return key, recipe, config.bits
