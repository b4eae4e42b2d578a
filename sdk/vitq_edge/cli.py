"""The `vitq-edge` command line. Thin: flags become options, the work is in the library."""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import sys
import warnings

import click

from vitq_edge.build_options import (
    DEFAULT_PROGRAMS,
    BuildOptions,
    check_build_options,
    check_compare_options,
    parse_model_kwargs,
)
from vitq_edge.data.options import DEFAULT_MAX_IMAGE_PIXELS, INTERPOLATIONS
from vitq_edge.errors import VitqError
from vitq_edge.lifetime import Terminated, handle_termination, sweep_temp
from vitq_edge.progress import close_bars, set_quiet
from vitq_edge.recipes import RECIPES, parse_options


def printable(text: str) -> str:
    """`text` safe to print: file names that are not UTF-8 arrive as surrogate escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _fail(message: str, code: int = 2) -> int:
    """The one funnel for failures: bars cleared, one `error:` line on stderr."""
    close_bars()
    one_line = "; ".join(part.strip() for part in message.splitlines() if part.strip())
    click.echo(f"error: {printable(one_line)}", err=True)
    return code


class _Group(click.Group):
    """Every failure becomes `error: <message>` on one line and exit code 2, without a traceback.

    Click's own usage errors (unknown option, bad value) get the same one-line form instead of
    its Usage/Try/Error block; SIGTERM and Ctrl-C unwind (cleanup runs) and exit 128 + signal.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = sys.argv[1:] if args is None else list(args)
        try:
            with self.make_context(prog_name or "vitq-edge", args, **extra) as ctx:
                self.invoke(ctx)
            code = 0
        except click.exceptions.Exit as exc:  # --help, --version
            code = exc.exit_code
        except click.UsageError as exc:
            # command_path starts with the name click was invoked under; users type vitq-edge.
            sub = exc.ctx.command_path.split(" ", 1)[1:] if exc.ctx else []
            code = _fail(f"{exc.format_message()} (see `{' '.join(['vitq-edge', *sub])} --help`)", exc.exit_code)
        except click.ClickException as exc:
            code = _fail(exc.format_message(), 2)
        except VitqError as exc:
            code = _fail(str(exc))
        except Terminated as exc:
            code = _fail(f"stopped by {exc}", 128 + exc.signum)
        except (KeyboardInterrupt, click.Abort):
            code = _fail("interrupted", 130)
        except BrokenPipeError:  # `vitq-edge ... | head`: the reader left; nothing to report
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            code = 1
        if not standalone_mode:
            return code
        sys.exit(code)


def _floats(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        values = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter("expected comma-separated numbers, e.g. 0.485,0.456,0.406") from None
    if not all(math.isfinite(v) for v in values):
        raise click.BadParameter(f"'{value}' holds NaN or infinity; give finite numbers")
    return values


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="vitq-edge")
def main() -> None:
    """Quantize timm Vision Transformers and ship them as ExecuTorch programs for ARM.

    \b
    Quick start:
      vitq-edge build --target rpi4        # bundled reference model -> build/rpi4/
      vitq-edge eval build/rpi4            # its accuracy in ExecuTorch's runtime
      vitq-edge targets                    # what you can build for
    """
    _quiet_libraries()
    sweep_temp()  # what killed commands left behind


def _quiet_libraries() -> None:
    # torch/torchao/executorch deprecation chatter says nothing a CLI user can act on.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*(TypedStorage|LeafSpec|non-writable).*")
    # torch is imported later, by the command, and then sets its loggers' levels from TORCH_LOGS:
    # "-torch" is its spelling of ERROR for all of torch (a user's own TORCH_LOGS wins).
    os.environ.setdefault("TORCH_LOGS", "-torch")
    for name in ("torch", "torchao", "executorch", "timm", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _recipe_help() -> str:
    lines = "; ".join(f"{name} ({cls.summary})" for name, cls in RECIPES.items())
    return f"Quantization recipe: {lines}. docs/results.md compares them."


def _bits_help() -> str:
    widths = "; ".join(f"{name}: {cls.bits_choices()}" for name, cls in RECIPES.items())
    return (f"Weight/activation bits, per recipe ({widths}). mixed:N: one width per MSA/MLP module within the "
            "size of N-bit weights. Default: the recipe's first.")


_RECIPE_HELP = _recipe_help()
_BITS_HELP = _bits_help()

_MAX_PIXELS_HELP = ("Refuse images with more pixels than this (decompression bombs: a few KB can declare "
                    "billions of pixels).")


_MODEL_AND_DATA_OPTIONS = [
    click.option("--model", default=None, metavar="NAME",
                 help="A timm ViT/DeiT name (e.g. deit_tiny_patch16_224), dinov2-s14-cifar10 (a real pretrained "
                      "ViT-S/14 with a CIFAR-10 probe). Default: the bundled reference model."),
    click.option("--pretrained", is_flag=True, help="Load timm's pretrained weights (needs network access)."),
    click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
                 help="A local state dict (torch.save(model.state_dict(), FILE))."),
    click.option("--model-kwargs", default=None, metavar="K=V,...",
                 help="Override timm arguments, e.g. img_size=32,patch_size=4,in_chans=3,num_classes=100."),
    click.option("--calib", type=click.Path(), default=None,
                 help="Calibration images, ImageFolder layout. Default: the model's own (bundled 1,024 "
                      "Fashion-MNIST train images; CIFAR-10 train for dinov2-s14-cifar10)."),
    click.option("--eval", "eval_dir", type=click.Path(), default=None,
                 help="Evaluation images, ImageFolder layout. Default: the model's own (bundled Fashion-MNIST "
                      "test split; CIFAR-10 test for dinov2-s14-cifar10)."),
    click.option("--calib-limit", type=click.IntRange(min=1), default=None,
                 help="Use only the first N calibration images."),
    click.option("--eval-limit", type=click.IntRange(min=1), default=None, help="Evaluate only the first N images."),
    click.option("--skip-eval", is_flag=True, help="Do not measure accuracy (e.g. random-weight cost builds)."),
    click.option("--mean", callback=_floats, default=None, help="Override normalization mean (comma-separated)."),
    click.option("--std", callback=_floats, default=None, help="Override normalization std (comma-separated)."),
    click.option("--input-size", type=click.IntRange(min=1), default=None, help="Override the square input size."),
    click.option("--crop-pct", type=click.FloatRange(min=0, max=1, min_open=True), default=None,
                 help="Override timm's crop_pct: resize the shorter side to size / crop_pct, then center-crop to "
                      "size (1 = resize to size, no margin). Default: the model's data config."),
    click.option("--interpolation", type=click.Choice(INTERPOLATIONS), default=None,
                 help="Override the resize interpolation. Default: the model's data config."),
    click.option("--max-image-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_IMAGE_PIXELS,
                 help=_MAX_PIXELS_HELP),
]


def _model_and_data_options(f):
    """The options that say which model and which images (build and compare take the same)."""
    for option in reversed(_MODEL_AND_DATA_OPTIONS):
        f = option(f)
    return f


@main.command()
@click.option("--target", default="rpi4", help="Deployment target (see `vitq-edge targets`).")
@click.option("--recipe", default="xnnpack-int8", help=_RECIPE_HELP)
@click.option("--bits", default=None, help=_BITS_HELP)
@click.option("--iters", type=click.IntRange(min=0), default=None,
              help="adfq: reconstruction iterations per module. Default: the paper's 3000 (of 32 images) where "
                   "that is affordable (GPU, small models), else as many as under an hour on a 2-core CPU buys "
                   "(600 of 8 images for a 224-px ViT-S). --iters 3000 = the paper's schedule.")
@click.option("--calib-device", default="cpu", metavar="cpu|cuda",
              help="Where the paper recipes calibrate (cuda needs a GPU visible to torch); --device of eval and "
                   "bench is where a program runs.")
@click.option("--option", "recipe_options", multiple=True, metavar="KEY=VALUE",
              help="Set any field of the recipe's config, e.g. --option search_tokens=0 --option search=grid "
                   "(liu2021's paper settings) or --option batch_size=8; repeatable. The fields and defaults: "
                   "vitq_edge/recipes.py.")
@_model_and_data_options
@click.option("--out", default=None, help="Output folder: new, empty, or an earlier build (replaced whole). "
                                          "Default: build/<target>.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or status lines.")
def build(target, recipe, bits, iters, calib_device, recipe_options, model, pretrained, checkpoint, model_kwargs,
          calib, eval_dir, calib_limit, eval_limit, skip_eval, mean, std, input_size, crop_pct, interpolation,
          max_image_pixels, out, quiet) -> None:
    """Quantize a model, lower it to a .pte, and write model.pte, manifest.json, report.md."""
    set_quiet(quiet)
    opts = BuildOptions(target=target, recipe=recipe, bits=bits, iters=iters, calib_device=calib_device,
                        recipe_options=parse_options(recipe_options), model=model,
                        pretrained=pretrained,
                        checkpoint=checkpoint, model_kwargs=parse_model_kwargs(model_kwargs), calib=calib,
                        eval=eval_dir, calib_limit=calib_limit, eval_limit=eval_limit, skip_eval=skip_eval,
                        mean=mean, std=std, input_size=input_size, crop_pct=crop_pct, interpolation=interpolation,
                        max_image_pixels=max_image_pixels, out=out,
                        command="vitq-edge " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    check_build_options(opts)  # usage errors before the build's imports (seconds)
    from vitq_edge.build import build as run_build

    result = run_build(opts)
    acc = result.manifest["accuracy"]
    summary = f"wrote {result.out}/ ({result.manifest['size_bytes'] / 1e6:.2f} MB .pte)"
    if acc:
        summary += (f"; top-1 fp32 {acc['fp32']:.2f}%, simulated {acc['simulated']:.2f}%, "
                    f".pte {acc['pte_host']:.2f}% on {acc['eval_images']} images")
    click.echo(printable(summary))


_DEVICES_EPILOG = """\b
Devices (--device):
  host                    the host runner bundle (build/runtime/host), on this CPU
  emulated-rpi4           the aarch64 bundle under qemu-aarch64 -cpu cortex-a72 with a
                          Raspberry Pi 4 CPU description; also counts instructions
  emulated-rpi5           likewise, Cortex-A76 (Raspberry Pi 5)
  ssh://user@host[:port]  a real board: copies the aarch64 bundle, the .pte and the inputs
                          to a temporary folder there, runs, fetches, removes it
\b
Environment:
  VITQ_RUNTIME_DIR          runner bundles (default <repo>/build/runtime; build them
                            with `bash tools/build_runtime.sh`)
  VITQ_QEMU                 qemu-aarch64 to use (default: the one on PATH)
  VITQ_QEMU_PLUGIN          instruction-count plugin (default
                            <runtime dir>/qemu-plugin/libinsn_count.so)
  VITQ_SSH_OPTS             extra ssh/scp options, e.g. "-i ~/.ssh/pi_key"
  VITQ_SSH_CONNECT_TIMEOUT  seconds to connect and log in (default 10)
  VITQ_SSH_WRAPPER          command the device puts before the runner, e.g.
                            "qemu-aarch64 -L PREFIX" on a non-ARM machine
"""


@main.command("eval", epilog=_DEVICES_EPILOG)
@click.argument("path", type=click.Path())
@click.option("--data", type=click.Path(), default=None,
              help="ImageFolder of labelled images. Default: the bundled Fashion-MNIST test split.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate only the first N images.")
@click.option("--device", "device", default=None, metavar="DEVICE",
              help="Run the .pte with vitq-runner on DEVICE (see below): images are preprocessed here as the "
                   "manifest says, logits computed there. Default: ExecuTorch's Python runtime in this process.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
              help="With --device: stop and fail after SECONDS.")
@click.option("--max-image-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_IMAGE_PIXELS,
              help=_MAX_PIXELS_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object with top1, top5, n.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def eval_(path, data, limit, device, timeout, max_image_pixels, as_json, quiet) -> None:
    """Run a built .pte (build folder or model.pte) and print its top-1/top-5 accuracy.

    Without --device it runs in ExecuTorch's Python runtime here; with --device the C++
    vitq-runner computes the logits on that device.
    """
    set_quiet(quiet)
    if device is None and timeout is not None:
        raise VitqError("--timeout applies to --device runs; add --device host (or another device)")
    _check_eval_inputs(path, data, device)  # usage errors before the evaluation's imports (seconds)
    from vitq_edge.evaluate import evaluate_on_device, evaluate_program

    if device is None:
        result = evaluate_program(path, data=data, limit=limit, max_pixels=max_image_pixels)
    else:
        result = evaluate_on_device(path, device, data=data, limit=limit, timeout=timeout,
                                    max_pixels=max_image_pixels)
    if as_json:
        click.echo(json.dumps(result))
    else:
        mapping = f"; classes by {result['class_mapping']}" if result.get("class_mapping") else ""
        click.echo(printable(f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  on {result['n']} images "
                             f"({result['data']}{mapping})" + (f" on {result['device']}" if device else "")))


def _check_eval_inputs(path: str, data: str | None, device: str | None) -> None:
    """The program, its manifest, the image folder and the device exist (their contents are read later)."""
    from pathlib import Path

    from vitq_edge.artifacts import check_arithmetic, resolve_build
    from vitq_edge.data.options import check_data_folder

    check_arithmetic(resolve_build(path)[1], path)
    if data:
        check_data_folder(Path(data))
    if device is not None:
        from vitq_edge.device import get_device

        get_device(device)


@main.command(epilog=_DEVICES_EPILOG)
@click.argument("path", type=click.Path())
@click.option("--device", default="host", metavar="DEVICE", help="Where to run (see below).")
@click.option("--runs", type=click.IntRange(min=1), default=None,
              help="Timed forward calls.  [default: 10; 3 on emulated devices]")
@click.option("--warmup", type=click.IntRange(min=0), default=1, help="Untimed forward calls first.")
@click.option("--threads", type=click.IntRange(min=0), default=1,
              help="Runner thread-pool size; 0 = one per core. On emulated devices more than 1 reports the "
                   "modelled critical path of that many threads as the instruction count.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
              help="Stop and fail after SECONDS.")
@click.option("--no-record", is_flag=True, help="Do not append the result to the build's manifest.json.")
@click.option("--profile", is_flag=True,
              help="Also run the same calls under ExecuTorch's event tracer and print the slowest operators and "
                   "delegate calls (saves the ETDump as profile-<device>.etdp beside the .pte).")
@click.option("--top", type=click.IntRange(min=1), default=None, metavar="N",
              help="With --profile: how many rows to print.  [default: 10]")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (with --profile: all rows).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def bench(path, device, runs, warmup, threads, timeout, no_record, profile, top, as_json, quiet) -> None:
    """Time a .pte (build folder or .pte) on a device with vitq-runner.

    Prints latency, instructions per inference (emulated devices), peak memory and
    program size, and appends the result to the build folder's manifest.json under
    `benchmarks`. Input: the runner's deterministic synthetic image.

    --profile adds a per-operator profile from a second, traced run of the same calls
    (ExecuTorch's ETDump, read with its devtools Inspector): each non-delegated operator
    and each kind of delegate call (XNNPACK subgraph), with its share of the inference,
    and the delegate's own operators. The timings above stay those of the untraced run.
    On emulated devices the profile's times are emulated wall time, not the board's.
    """
    from vitq_edge.bench import benchmark, format_bench

    set_quiet(quiet)
    if top is not None and not profile:
        raise VitqError("--top sets how many rows --profile prints; add --profile")
    result = benchmark(path, device=device, runs=runs, warmup=warmup, threads=threads, timeout=timeout,
                       record=not no_record, profile=profile)
    click.echo(json.dumps(result) if as_json else printable(format_bench(result, top=top)))

def _list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _thread_list(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    try:
        threads = [int(t) for t in _list(value)]
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a comma-separated list of thread counts, e.g. 1,4") from None
    if not threads or any(t < 1 for t in threads):
        raise click.BadParameter(f"'{value}': thread counts are whole numbers from 1, e.g. 1,4")
    return threads


@main.command(epilog=_DEVICES_EPILOG)
@click.option("--programs", default=None, metavar="PROGRAM,...",
              help="Comma-separated programs to build: RECIPE@BITS (e.g. minmax@W8A8, liu2021@mixed:6) or a recipe "
                   "alone (fp32, xnnpack-int8; paper recipes at their first width).  [default: fp32, xnnpack-int8, "
                   "and minmax, liu2021, adfq at W8A8 and W4A4]")
@click.option("--devices", default="host", metavar="DEVICE,...",
              help="Where to bench every program (comma-separated; see below). Empty: no benchmarks.")
@click.option("--threads", "threads", default="1", callback=_thread_list, metavar="N,...",
              help="Thread counts to bench each program with, e.g. 1,4.")
@click.option("--runs", type=click.IntRange(min=1), default=None,
              help="Timed forward calls per benchmark.  [default: 10; 3 on emulated devices]")
@click.option("--rebench", is_flag=True,
              help="Bench the listed programs again on every device and thread count, replacing results the "
                   "table already has (e.g. after rebuilding the runtime). Without it a rerun benches only "
                   "what is missing.")
@click.option("--rebuild", is_flag=True,
              help="Build and measure the listed programs again, replacing their rows and benches (e.g. a row "
                   "whose program folder is gone: a paper recipe built on another CPU may give other bytes).")
@click.option("--out", default="compare", show_default=True,
              help="Folder for the programs (programs/<recipe>-<bits>/) and the table (compare.md, compare.json, "
                   "compare.png). Rerunning the same command there resumes: finished rows are kept.")
@click.option("--table", default=None, metavar="STEM",
              help="Write the table as STEM.md, STEM.json, STEM.png instead of OUT/compare.* (e.g. docs/results).")
@click.option("--target", default="rpi4", help="Deployment target of every build.")
@_model_and_data_options
@click.option("--iters", type=click.IntRange(min=0), default=None, help="adfq rows: reconstruction iterations.")
@click.option("--calib-device", default="cpu", metavar="cpu|cuda",
              help="Where the paper recipes calibrate (cuda needs a GPU visible to torch).")
@click.option("--option", "recipe_options", multiple=True, metavar="KEY=VALUE",
              help="Set any field of the recipe's config, e.g. --option search_tokens=0 --option search=grid "
                   "(liu2021's paper settings) or --option batch_size=8; repeatable; applied to every program "
                   "whose recipe has the field. The fields and defaults: vitq_edge/recipes.py.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or status lines.")
def compare(programs, devices, threads, runs, rebench, rebuild, out, table, target, model, pretrained, checkpoint,
            model_kwargs, calib, eval_dir, calib_limit, eval_limit, skip_eval, mean, std, input_size, crop_pct,
            interpolation, max_image_pixels, iters, calib_device, recipe_options, quiet) -> None:
    """Build several programs of one model, measure them on the same images and devices, write one table.

    Every program is a normal build folder under OUT/programs/. Accuracy: the float model,
    the simulated quantized model and the .pte on the same images (top-1, drop, agreement,
    logit SQNR); cost: `vitq-edge bench` on each device and thread count. OUT/compare.json,
    compare.md and compare.png are rewritten after every finished step, so an interrupted
    run resumes where it stopped when the same command is run again.
    """
    set_quiet(quiet)
    shared = BuildOptions(target=target, iters=iters, calib_device=calib_device,
                          recipe_options=parse_options(recipe_options), model=model, pretrained=pretrained,
                          checkpoint=checkpoint, model_kwargs=parse_model_kwargs(model_kwargs), calib=calib,
                          eval=eval_dir, calib_limit=calib_limit, eval_limit=eval_limit, skip_eval=skip_eval,
                          mean=mean, std=std, input_size=input_size, crop_pct=crop_pct, interpolation=interpolation,
                          max_image_pixels=max_image_pixels)
    program_list = _list(programs) if programs is not None else list(DEFAULT_PROGRAMS)
    check_compare_options(program_list, shared)  # usage errors before the imports (seconds)
    from vitq_edge.compare import CompareOptions, summary_lines
    from vitq_edge.compare import compare as run_compare

    opts = CompareOptions(build=shared, programs=program_list, devices=_list(devices), threads=threads, runs=runs,
                          rebench=rebench, rebuild=rebuild, out=out, table=table,
                          command="vitq-edge " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    result = run_compare(opts)
    for line in summary_lines(result):
        click.echo(printable(line))
    stem = table or f"{out}/compare"
    click.echo(printable(f"wrote {stem}.md, {stem}.json, {stem}.png; programs in {out}/programs/"))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def targets(as_json) -> None:
    """List deployment targets with their CPU and ABI."""
    from vitq_edge.targets import TARGETS

    if as_json:
        click.echo(json.dumps([t.__dict__ for t in TARGETS.values()], indent=2))
        return
    width = max(len(n) for n in TARGETS)
    for t in TARGETS.values():
        click.echo(f"{t.name:<{width}}  {t.cpu:<20}  {t.abi:<22}  {t.description}")


def run() -> None:
    """The `vitq-edge` console script: the CLI, with SIGTERM/SIGHUP unwinding like Ctrl-C."""
    handle_termination()
    main(prog_name="vitq-edge")


if __name__ == "__main__":
    run()
