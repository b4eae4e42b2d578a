"""What `vitq-edge build` takes (`BuildOptions`) and the checks that need no model.

Light on purpose (no torch, no ExecuTorch): the CLI runs `check_build_options` before it
imports the build, so a usage error (unknown target or recipe, bad --bits or --option, a
missing folder or checkpoint, an --out the build may not replace) answers at once.
`build()` runs the same checks, for callers that skip the CLI.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

from vitq_edge.artifacts import check_checkpoint_path, check_inputs_outside, check_output_folder
from vitq_edge.data.options import DEFAULT_MAX_IMAGE_PIXELS, check_data_folder
from vitq_edge.errors import VitqError
from vitq_edge.recipes import (
    PAPER_RECIPES,
    RecipeConfig,
    options_for_recipe,
    parse_program,
    recipe_config,
    recipe_option_names,
)
from vitq_edge.targets import Target, get_target


@dataclass
class BuildOptions:
    target: str = "rpi4"
    recipe: str = "xnnpack-int8"
    bits: str | None = None
    iters: int | None = None  # adfq reconstruction iterations
    recipe_options: dict = field(default_factory=dict)  # --option KEY=VALUE: any field of the recipe's config
    calib_device: str = "cpu"  # where the paper recipes calibrate
    model: str | None = None  # None: the bundled reference model
    pretrained: bool = False
    checkpoint: str | None = None
    model_kwargs: dict = field(default_factory=dict)
    calib: str | None = None  # ImageFolder; None: the bundled calibration set
    eval: str | None = None  # ImageFolder; None: the bundled evaluation set
    calib_limit: int | None = None
    eval_limit: int | None = None
    skip_eval: bool = False
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    input_size: int | None = None
    crop_pct: float | None = None  # timm's meaning: resize the shorter side to size / crop_pct, center-crop
    interpolation: str | None = None  # nearest, bilinear, bicubic, lanczos
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    batch_size: int = 64
    out: str | None = None  # default build/<target>
    command: str = ""


@dataclass(frozen=True)
class CheckedBuild:
    """What the checks resolved: the target, the recipe's config, the output folder."""

    target: Target
    config: RecipeConfig
    out: Path


def check_build_options(opts: BuildOptions) -> CheckedBuild:
    """Every check of a build's options that needs no model or image; raises VitqError."""
    target = get_target(opts.target)
    config = recipe_config(opts.recipe, opts.bits, **recipe_options(opts))
    if opts.out is not None and not opts.out.strip():
        raise VitqError("--out is empty; name the output folder (default: build/<target>)")
    out = Path(opts.out or f"build/{target.name}")
    # Before any work: where the result goes, and that replacing it loses nothing we read.
    check_inputs_outside(out, {"--checkpoint": opts.checkpoint, "--calib": opts.calib, "--eval": opts.eval})
    check_output_folder(out.absolute())
    _check_inputs(opts)
    return CheckedBuild(target, config, out)


def _check_inputs(opts: BuildOptions) -> None:
    """The checkpoint and image folders exist and look right (their contents are read later)."""
    if opts.checkpoint is not None:
        check_checkpoint_path(Path(opts.checkpoint))
    for folder, used in ((opts.calib, True), (opts.eval, not opts.skip_eval)):
        if folder and used:
            check_data_folder(Path(folder))


def check_compare_options(programs: list[str], shared: BuildOptions) -> dict[str, tuple[str, str]]:
    """`vitq-edge compare`'s checks that need no model: the programs (`check_programs`), the target,
    the checkpoint and image folders every row shares."""
    specs = check_programs(programs, shared.recipe_options)
    get_target(shared.target)
    _check_inputs(shared)
    return specs


# What `vitq-edge compare` builds when --programs is not given.
DEFAULT_PROGRAMS = ("fp32", "xnnpack-int8", "minmax@W8A8", "liu2021@W8A8", "adfq@W8A8",
                    "minmax@W4A4", "liu2021@W4A4", "adfq@W4A4")


def check_programs(programs: list[str], options: dict) -> dict[str, tuple[str, str]]:
    """`vitq-edge compare`'s programs as {row name: (recipe, bits)}, each checked with the --option
    values its recipe has; every --option must belong to some program's recipe."""
    if not programs:
        raise VitqError("no programs to compare: pass --programs, e.g. fp32,minmax@W8A8,adfq@W4A4")
    specs = {key: (recipe, bits) for key, recipe, bits in map(parse_program, programs)}
    recipes = list(dict.fromkeys(recipe for recipe, _ in specs.values()))
    for key in options:
        if not any(key in recipe_option_names(recipe) for recipe in recipes):
            raise VitqError(f"--option {key}: none of the programs' recipes ({', '.join(recipes)}) has that field")
    for recipe, bits in specs.values():  # typos and bad values before any work
        recipe_config(recipe, bits, **options_for_recipe(options, recipe))
    return specs


def recipe_options(opts: BuildOptions) -> dict:
    """Build flags that configure the recipe; refused where the recipe has no such knob."""
    options = dict(opts.recipe_options)
    if opts.iters is not None:
        if opts.recipe != "adfq":
            raise VitqError(f"--iters applies to --recipe adfq, not {opts.recipe}")
        options["iters"] = opts.iters
    if opts.calib_device != "cpu":
        if opts.recipe not in PAPER_RECIPES:
            raise VitqError(f"--calib-device {opts.calib_device} applies to the paper recipes "
                            f"({', '.join(PAPER_RECIPES)})")
        options["device"] = opts.calib_device
    return options


def parse_model_kwargs(text: str | None) -> dict:
    """'img_size=32,patch_size=4,global_pool=avg' -> {'img_size': 32, ...}."""
    if not text:
        return {}
    kwargs = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise VitqError(f"bad --model-kwargs entry '{part}': write key=value pairs separated by commas")
        try:
            kwargs[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kwargs[key] = value.strip()  # a bare word such as global_pool=avg
    return kwargs
