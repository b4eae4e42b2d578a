"""`vitq-edge compare`: several programs of one model, measured on the same images and devices, in one table.

Each program (`recipe@bits`, e.g. `minmax@W8A8`, `liu2021@mixed:6`, `fp32`) is built with
`vitq-edge build` into OUT/programs/<recipe>-<bits>/ (a normal build folder: ship it, bench it).
Every row is evaluated on the same preprocessed images, against the float model's logits
computed once: top-1 of the float model, of the simulated quantized model and of the .pte in
ExecuTorch's runtime here; drop, agreement with the float top-1 and logit SQNR. Then every
program is benched on every device and thread count asked for.

OUT/compare.json (or --table STEM: STEM.json) is rewritten (atomically) after each finished
build and each finished bench, with .md and .png beside it rendered from it. Run the same command again and it
resumes: rows already measured with the same settings are kept, only the missing work runs (a row
whose program folder is gone is built again where it is to be benched).
"""

from __future__ import annotations

import datetime
import json
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

import vitq_edge
from vitq_edge.artifacts import PROGRAM, file_sha256, program_arithmetic_version, write_atomic
from vitq_edge.bench import benchmark
from vitq_edge.build import build, eval_images, load_for_build
from vitq_edge.build_options import DEFAULT_PROGRAMS, BuildOptions, check_programs
from vitq_edge.data.datasets import ImageSet
from vitq_edge.device.host_runtime import HostProgram
from vitq_edge.errors import VitqError
from vitq_edge.hostinfo import build_machine, this_build_machine
from vitq_edge.metrics import accuracy_summary
from vitq_edge.models.source import LoadedModel
from vitq_edge.progress import progress, status
from vitq_edge.quant.vit import simulate
from vitq_edge.recipes import PAPER_RECIPES, RECIPES, options_for_recipe, parse_bits
from vitq_edge.runtime import ARITHMETIC_VERSION, UNRECORDED_ARITHMETIC

COMPARE_FORMAT = "vitq-edge-compare/1"
TABLE_STEM = "compare"  # OUT/compare.{json,md,png} unless --table says where


@dataclass
class CompareOptions:
    """What to compare: `build` holds what every program shares (model, images, preprocessing,
    recipe options, target), as `vitq-edge build` takes it; each row sets its recipe and bits."""

    build: BuildOptions = field(default_factory=BuildOptions)
    programs: list[str] = field(default_factory=lambda: list(DEFAULT_PROGRAMS))
    devices: list[str] = field(default_factory=lambda: ["host"])
    threads: list[int] = field(default_factory=lambda: [1])
    runs: int | None = None  # bench runs per device (default: bench's own)
    rebench: bool = False  # bench the programs again where the table has results (e.g. a rebuilt runtime)
    rebuild: bool = False  # build and measure the programs again, replacing their rows (benches included)
    out: str = "compare"
    table: str | None = None  # stem of the table files (default OUT/compare)
    eval_set: ImageSet | None = None  # Python callers: an image set instead of --eval (e.g. a validation split)
    # Python callers: markdown lines appended to the table on every write (e.g. targets checked against the rows).
    sections: Callable[[dict], list[str]] | None = None
    command: str = ""


def _folder_name(key: str) -> str:
    return key.replace("@", "-").replace(":", "")


@dataclass
class _EvalImages:
    """The evaluation images preprocessed once, and the float model's logits on them."""

    name: str
    batches: list[torch.Tensor]
    labels: torch.Tensor
    fp32_logits: torch.Tensor | None = None


def _evaluator(images: _EvalImages) -> Callable[[LoadedModel, torch.nn.Module, HostProgram], dict]:
    """build()'s accuracy step for a compare row: simulated and .pte logits on the shared images."""

    def evaluate(loaded: LoadedModel, module: torch.nn.Module, program: HostProgram) -> dict:
        same = module is loaded.model  # the fp32 recipe simulates with the float model itself
        sim, pte = [], []
        with torch.no_grad():
            for x in progress(images.batches, "evaluating", unit="batch"):
                if not same:
                    sim.append(simulate(module, x))
                pte.append(program(x))
        sim_logits = images.fp32_logits if same else torch.cat(sim)
        acc = accuracy_summary(images.fp32_logits, sim_logits, torch.cat(pte), images.labels)
        return {**acc, "eval_set": images.name}

    return evaluate


def _settings(opts: CompareOptions) -> dict:
    """What makes rows comparable: a resumed run must use the same (the table refuses to mix)."""
    b = opts.build
    return {"model": b.model or "reference", "pretrained": b.pretrained, "checkpoint": b.checkpoint,
            "model_kwargs": b.model_kwargs, "target": b.target, "calib": b.calib, "calib_limit": b.calib_limit,
            "eval": b.eval if opts.eval_set is None else opts.eval_set.name, "eval_limit": b.eval_limit,
            "skip_eval": b.skip_eval, "iters": b.iters, "recipe_options": b.recipe_options,
            "preprocess": _preprocess_flags(b)}


def _preprocess_flags(b: BuildOptions) -> dict:
    flags = {"--mean": b.mean, "--std": b.std, "--input-size": b.input_size, "--crop-pct": b.crop_pct,
             "--interpolation": b.interpolation}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in flags.items() if v is not None}


_OUT_ENTRIES = {"programs", f"{TABLE_STEM}.json", f"{TABLE_STEM}.md", f"{TABLE_STEM}.png"}


def _check_out(out: Path, stem: Path) -> None:
    """OUT is new, empty or a folder compare wrote (its programs, maybe its table, which --table
    may name inside OUT); never anything else."""
    if not out.exists():
        return
    if not out.is_dir():
        raise VitqError(f"--out {out} is a file; name a new folder or an earlier compare folder")
    ours = _OUT_ENTRIES | ({stem.with_suffix(s).name for s in (".json", ".md", ".png")}
                          if stem.parent.resolve() == out.resolve() else set())
    foreign = sorted(p.name for p in out.iterdir() if p.name not in ours and not p.name.endswith(".tmp"))
    if foreign:
        raise VitqError(f"--out {out} holds {', '.join(foreign[:3])}: not a compare folder; choose a new or empty "
                        "folder")


def read_table(stem: Path) -> dict | None:
    """The table an earlier compare run wrote at STEM.json, None where there is none."""
    path = stem.with_suffix(".json")
    if not path.is_file():
        for other in (stem.with_suffix(".md"), stem.with_suffix(".png")):
            if other.exists():
                raise VitqError(f"{other} exists and {path} does not: compare would overwrite a file it did not "
                                "write; choose another --table or --out")
        return None
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        table = None
    if not isinstance(table, dict) or table.get("format") != COMPARE_FORMAT or not isinstance(table.get("rows"), list):
        raise VitqError(f"{path} was not written by `vitq-edge compare`; choose another --table or --out")
    return table


def _check_resumable(table: dict, settings: dict, path: Path) -> None:
    old = table.get("settings", {})
    # A setting newer than the table counts as unset there: rows stay resumable across versions.
    changed = [k for k in settings if old.get(k) != settings[k] and (k in old or settings[k])]
    if changed:
        diffs = ", ".join(f"{k}: {old.get(k)!r} then, {settings[k]!r} now" for k in changed)
        raise VitqError(f"{path} holds rows measured with other settings ({diffs}); rerun with the same settings to "
                        "resume, or pass a new --out")


def compare(opts: CompareOptions) -> dict:
    """Build, evaluate and bench every program; returns the table (also written to OUT)."""
    specs = check_programs(opts.programs, opts.build.recipe_options)
    keys = list(specs)
    out = Path(opts.out)
    stem = Path(opts.table) if opts.table else out / TABLE_STEM
    _check_out(out, stem)
    settings = _settings(opts)
    table = read_table(stem)
    if table is not None:
        _check_resumable(table, settings, stem.with_suffix(".json"))
    else:
        table = {"format": COMPARE_FORMAT, "settings": settings, "rows": []}
    host = this_build_machine()
    table.update(command=opts.command, vitq_edge_version=vitq_edge.__version__, host=host)
    if opts.command not in table.setdefault("commands", []):  # every run that added to the table
        table["commands"].append(opts.command)
    try:
        out.mkdir(parents=True, exist_ok=True)
        stem.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VitqError(f"cannot create {exc.filename} ({exc.strerror}); choose a writable --out/--table") from None
    rows = {r["program"]: r for r in table["rows"]}

    def save() -> None:
        table["rows"] = sorted(rows.values(), key=_row_order)
        table["updated"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        write_table(stem, table, opts.sections)

    def bench_jobs_of(key: str) -> list[tuple[str, int]]:
        done = rows[key].get("bench", {}) if key in rows else {}
        return [(d, t) for d in opts.devices for t in opts.threads if opts.rebench or _bench_key(d, t) not in done]

    # A measured row whose program folder is gone (e.g. a fresh checkout of a committed table) is built
    # again only where it is to be benched: the same settings make the same program. A row measured on
    # another integer arithmetic is built again: its figures are not what this version's programs give.
    todo = [(k, specs[k]) for k in keys
            if opts.rebuild or k not in rows or not row_is_current(rows[k])
            or (bench_jobs_of(k) and not (out / rows[k]["folder"] / "model.pte").is_file())]
    loaded, images = None, None
    for key, (recipe, bits) in progress(todo, "compare: building", unit="program"):
        if loaded is None:
            torch.manual_seed(0)  # a model without a checkpoint gets the same random weights when resumed
            loaded = load_for_build(_build_options(opts, "fp32", None, None))
            images = None if opts.build.skip_eval else _prepare_images(opts, loaded)
        if key in rows and not row_is_current(rows[key]):
            status(f"compare: {key} was measured on integer arithmetic {_row_arithmetic(rows[key])}, this vitq-edge "
                   f"computes {ARITHMETIC_VERSION}: building it again")
        status(f"compare: building {key}")
        rows[key] = _build_row(opts, key, recipe, bits, out, loaded, images)
        save()

    bench_jobs = [(k, d, t) for k in keys for d, t in bench_jobs_of(k)]
    for key, device, threads in progress(bench_jobs, "compare: benching", unit="run"):
        status(f"compare: benching {key} on {device}, {threads} thread{'s' if threads != 1 else ''}")
        r = benchmark(out / rows[key]["folder"], device=device, runs=opts.runs, threads=threads,
                      warmup=1)
        rows[key].setdefault("bench", {})[_bench_key(device, threads)] = {
            "device": device, "threads": r["threads"], "instructions": r["instructions_per_inference"],
            "latency_ms_median": r["latency_ms"]["median"], "latency_is_emulated": r["latency_is_emulated"],
            "runs": r["runs"], "peak_rss_mb": r.get("peak_rss_mb"), "measured": r["created"],
            # which int8 GEMM our kernels ran (it sets the host's latency), and which program: a rebuilt row
            # can be checked for the same bytes
            "gemm": r.get("kernels_gemm"), "pte_sha256": r.get("pte_sha256")}
        save()
    save()
    return table


def _row_order(row: dict) -> tuple[int, int, int, bool]:
    """Where a row stands in the table, whatever order (resumed) runs built them in: the recipes in the
    registry's order (stock first), each from its widest width to its narrowest, uniform before mixed."""
    recipes = list(RECIPES)
    bits = row["bits"]
    w, a = parse_bits(bits) if bits != "fp32" else (32, 32)
    return (recipes.index(row["recipe"]) if row["recipe"] in recipes else len(recipes), -w, -a,
            bits.startswith("mixed:"))


def _row_arithmetic(row: dict) -> int | None:
    """The integer arithmetic a row was measured on; None for stock rows (fp32, XNNPACK's int8)."""
    if row["recipe"] not in PAPER_RECIPES:
        return None
    return row.get("arithmetic_version", UNRECORDED_ARITHMETIC)


def row_is_current(row: dict) -> bool:
    """Whether a row's figures are what this version's program of it gives (its arithmetic is this one)."""
    return _row_arithmetic(row) in (None, ARITHMETIC_VERSION)


def _bench_key(device: str, threads: int) -> str:
    return f"{device}@{threads}"


def _prepare_images(opts: CompareOptions, loaded: LoadedModel) -> _EvalImages:
    """The evaluation images preprocessed once, and the float model's logits on them."""
    data = opts.eval_set.limit(opts.build.eval_limit) if opts.eval_set is not None else eval_images(
        loaded, opts.build.eval, opts.build.eval_limit, opts.build.max_image_pixels)
    status(f"compare: reading {len(data)} evaluation images, running the float model on them")
    batches, labels = [], []
    for x, y in progress(data.batches(loaded.preprocess, opts.build.batch_size), "reading images",
                         total=-(-len(data) // opts.build.batch_size), unit="batch"):
        batches.append(x)
        labels.append(y)
    images = _EvalImages(data.name, batches, torch.cat(labels))
    with torch.no_grad():
        images.fp32_logits = torch.cat([loaded.model(x) for x in progress(batches, "float model", unit="batch")])
    return images


def _options_for(opts: CompareOptions, recipe: str) -> dict:
    return options_for_recipe(opts.build.recipe_options, recipe)


def _build_options(opts: CompareOptions, recipe: str, bits: str | None, out: Path | None) -> BuildOptions:
    """One row's build: the shared options, its recipe and bits, the recipe options its recipe has."""
    base = opts.build
    return replace(base, recipe=recipe, bits=bits, recipe_options=_options_for(opts, recipe),
                   iters=base.iters if recipe == "adfq" else None,
                   calib_device=base.calib_device if recipe in PAPER_RECIPES else "cpu",
                   out=None if out is None else str(out), command=opts.command)


def build_command(opts: CompareOptions, recipe: str, bits: str | None) -> str:
    """The `vitq-edge build` command that makes the same program as a compare row."""
    b = opts.build
    args = ["vitq-edge", "build", "--target", b.target, "--recipe", recipe]
    if bits and recipe != "fp32":
        args += ["--bits", bits]
    for flag, value in (("--model", b.model), ("--checkpoint", b.checkpoint), ("--calib", b.calib),
                        ("--calib-limit", b.calib_limit), ("--iters", b.iters if recipe == "adfq" else None)):
        if value is not None:
            args += [flag, str(value)]
    if b.pretrained:
        args.append("--pretrained")
    for key, value in _options_for(opts, recipe).items():
        args += ["--option", f"{key}={value}"]
    for flag, value in _preprocess_flags(b).items():
        args += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    if b.model_kwargs:
        args += ["--model-kwargs", ",".join(f"{k}={v}" for k, v in b.model_kwargs.items())]
    return " ".join(shlex.quote(a) for a in args)


def _build_row(opts: CompareOptions, key: str, recipe: str, bits: str | None, out: Path, loaded: LoadedModel,
               images: _EvalImages | None) -> dict:
    folder = Path("programs") / _folder_name(key)
    t0 = time.time()
    result = build(_build_options(opts, recipe, bits, out / folder),
                   evaluate=None if images is None else _evaluator(images), loaded=loaded)
    m = result.manifest
    quant = m.get("quantization") or {}
    return {
        "program": key, "recipe": m["recipe"], "bits": m["bits"], "folder": str(folder),
        "accuracy": m["accuracy"],
        "packed_size_bytes": quant.get("packed_size_bytes"),
        "pte_size_bytes": m["size_bytes"],
        # the program the accuracy was measured on (a bench of a rebuilt one is told apart by its hash)
        "pte_sha256": file_sha256(out / folder / PROGRAM),
        "program_arithmetic": quant.get("program_arithmetic", "float" if recipe == "fp32" else "xnnpack"),
        "arithmetic_version": program_arithmetic_version(m),
        "xnnpack_partitions": m["xnnpack_partitions"],
        "custom_ops": m["custom_ops"],
        "calibration_seconds": m["timings_seconds"]["calibration"],
        # the machine it was calibrated on (its wall time, and its bytes, depend on the CPU)
        "built_on": build_machine(m.get("host"), m.get("torch")),
        "build_seconds": round(time.time() - t0, 1),
        "calibration": m["calibration"],
        "recipe_config": m.get("recipe_config"),
        "mixed_precision_bits": quant.get("mixed_precision", {}).get("bits"),
        # PPOQ: the largest share of an input's calibration values kept as float outliers
        "outlier_fraction_max": max(quant["outlier_fraction"].values()) if quant.get("outlier_fraction") else None,
        "build_command": build_command(opts, recipe, bits),
    }


def write_table(stem: Path, table: dict, sections: Callable[[dict], list[str]] | None = None) -> None:
    text = json.dumps(table, indent=2) + "\n"
    write_atomic(stem.with_suffix(".json"), lambda f: f.write(text.encode()))
    md = render_markdown(table, chart=stem.with_suffix(".png").name)
    if sections is not None:
        md += "\n".join(["", *sections(table)]) + "\n"
    write_atomic(stem.with_suffix(".md"), lambda f: f.write(md.encode()))
    write_atomic(stem.with_suffix(".png"), lambda f: render_chart(table, f))


def _cost_columns(rows: list[dict]) -> list[str]:
    """The table's device@threads columns: devices in the order they first appear, each one's
    thread counts together and ascending (whichever row was benched first)."""
    keys = list(dict.fromkeys(k for r in rows for k in r.get("bench", {})))
    devices = list(dict.fromkeys(k.rsplit("@", 1)[0] for k in keys))

    def order(key: str) -> tuple[int, int]:
        device, threads = key.rsplit("@", 1)
        return devices.index(device), int(threads)

    return sorted(keys, key=order)


def _cost(entry: dict | None) -> str:
    if not entry:
        return "–"
    if entry["instructions"]:
        return f"{entry['instructions'] / 1e6:,.1f} M instr"
    return f"{entry['latency_ms_median']:.2f} ms"


def _notes(row: dict, host: str | None = None) -> str:
    """The row's notes; `host` is the table's (the last run's) machine, named in its header."""
    notes = []
    if host and row.get("built_on") and row["built_on"] != host:  # its calib s and its bytes came from there
        notes.append(f"built on {row['built_on']}")
    if not row_is_current(row):
        notes.append(f"integer arithmetic {_row_arithmetic(row)} (now {ARITHMETIC_VERSION}): rerun to rebuild")
    if row["recipe"] in PAPER_RECIPES and row.get("program_arithmetic") not in (None, "integer"):
        notes.append(f".pte {row['program_arithmetic']}")
    others = sorted(k for k, b in row.get("bench", {}).items()
                    if row.get("pte_sha256") and b.get("pte_sha256") not in (None, row["pte_sha256"]))
    if others:  # rebuilt after its folder was lost, on a CPU that rounds calibration differently (hostinfo.py)
        notes.append(f"{' '.join(others)} benched a rebuilt program, not the one measured here")
    if row.get("custom_ops") and row.get("bench"):
        notes.append(_gemm_note(row["bench"]))
    if row.get("outlier_fraction_max") is not None:
        notes.append(f"PPOQ outliers kept: max {100 * row['outlier_fraction_max']:.4f}% of values")
    return "; ".join(notes)


def _gemm_note(bench: dict) -> str:
    """Which int8 GEMM our kernels ran in each bench of a row (bench.GEMM_NAMES); tables older than the
    record say 'not recorded'."""
    by_gemm: dict[str, list[str]] = {}
    for key in _cost_columns([{"bench": bench}]):
        by_gemm.setdefault(bench[key].get("gemm") or "not recorded", []).append(key)
    return "GEMM " + ", ".join(f"{' '.join(keys)}: {gemm}" for gemm, keys in by_gemm.items())


def _num(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def render_markdown(table: dict, chart: str) -> str:
    rows = table["rows"]
    costs = _cost_columns(rows)
    s = table["settings"]
    lines = [
        f"# vitq-edge compare: {s['model']}",
        "",
        "Written by `vitq-edge compare` (resumed runs keep the rows already measured):",
        "",
        *[f"    {c}" for c in table.get("commands") or [table["command"]]],
        "",
        f"on {table['host']}, vitq-edge {table['vitq_edge_version']}, last row {table.get('updated', '')}.",
        "",
        "top-1 = the simulated quantized model (what the device computes); `.pte` = the program run in "
        "ExecuTorch's runtime here on the same images; drop = fp32 top-1 - top-1; agreement = share of images "
        "whose top-1 equals the float model's; SQNR = 10 log10(float logit power / logit error power); packed = "
        "weights at their bit width + float32 for the rest; calib = calibration wall time of the build. "
        "Device cost: instructions per inference on emulated devices (exact at 1 thread; at N threads the "
        "modelled critical path of N threads, runtime/qemu_plugin/README.md), median latency elsewhere; "
        "the column says device@threads; the notes name the int8 GEMM our kernels ran in each bench "
        "(runtime/README.md; on x86 it sets the latency).",
        "",
    ]
    head = ["program", "top-1 %", ".pte %", "drop", "agreement %", "SQNR dB", "packed MB", ".pte MB", "calib s",
            *costs, "notes"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        a = r.get("accuracy") or {}
        cells = [r["program"], _num(a.get("simulated"), ".2f"), _num(a.get("pte_host"), ".2f"),
                 _num(a.get("drop"), "+.2f"), _num(a.get("agreement"), ".2f"), _num(a.get("sqnr_db"), ".2f"),
                 _num(r["packed_size_bytes"] and r["packed_size_bytes"] / 1e6, ".2f"),
                 f"{r['pte_size_bytes'] / 1e6:.2f}", f"{r['calibration_seconds']:.0f}",
                 *[_cost(r.get("bench", {}).get(c)) for c in costs], _notes(r, table.get("host"))]
        lines.append("| " + " | ".join(cells) + " |")
    first = next((r["accuracy"] for r in rows if r.get("accuracy")), None)
    if first:
        lines += ["", f"Evaluated on {first['eval_images']} images of {first['eval_set']}; float model top-1 "
                      f"{first['fp32']:.2f}%."]
    lines += ["", "## Each row as a build command", ""]
    for r in rows:
        lines.append(f"- {r['program']}: `{r['build_command']}`")
        if r.get("recipe_config"):
            lines.append(f"  settings: `{json.dumps(r['recipe_config'], sort_keys=True)}`")
        if r.get("built_on"):
            lines.append(f"  built on: {r['built_on']}")
        if r.get("mixed_precision_bits"):
            lines.append(f"  bits per module: `{json.dumps(r['mixed_precision_bits'], sort_keys=True)}`")
    lines += ["", f"![accuracy against size and device cost]({chart})", ""]
    return "\n".join(lines)


def render_chart(table: dict, f) -> None:
    """Top-1 against packed size and against the first device cost; one point per program."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in table["rows"] if r.get("accuracy")]
    costs = _cost_columns(rows)
    panels = 1 + bool(costs)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)

    def scatter(ax, xs: list[float | None], label: str) -> None:
        for r, x in zip(rows, xs, strict=True):
            if x is None:
                continue
            ax.scatter(x, r["accuracy"]["simulated"], color="#4c72b0" if r["recipe"] in ("fp32", "xnnpack-int8")
                       else "#55a868")
            ax.annotate(r["program"], (x, r["accuracy"]["simulated"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 % (simulated)")
        ax.grid(alpha=0.3)

    scatter(axes[0][0], [(r["packed_size_bytes"] or r["pte_size_bytes"]) / 1e6 for r in rows],
            "size, MB (packed weights; .pte for stock programs)")
    if costs:
        # Instruction counts rank programs exactly; host latency where nothing was emulated.
        c = next((k for k in costs if any((r.get("bench", {}).get(k) or {}).get("instructions") for r in rows)),
                 costs[0])
        entries = [r.get("bench", {}).get(c) for r in rows]
        instr = any(e and e["instructions"] for e in entries)
        scatter(axes[0][1], [None if not e else (e["instructions"] / 1e6 if instr else e["latency_ms_median"])
                             for e in entries], f"{c}: {'M instructions' if instr else 'median ms'} per inference")
    if not rows:
        axes[0][0].text(0.5, 0.5, "no accuracy measured (--skip-eval)", ha="center", transform=axes[0][0].transAxes)
    fig.suptitle(f"{table['settings']['model']}: blue stock programs, green vitq-edge recipes")
    fig.tight_layout()
    fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def summary_lines(table: dict) -> list[str]:
    """What the CLI prints at the end: one line per program."""
    out = []
    for r in table["rows"]:
        a = r.get("accuracy")
        acc = (f"top-1 {a['simulated']:.2f}% (.pte {a['pte_host']:.2f}%, drop {a['drop']:+.2f})" if a
               else "accuracy not measured")
        benches = ", ".join(f"{k} {_cost(v)}" for k, v in r.get("bench", {}).items())
        line = f"{r['program']:<18} {acc}; {r['pte_size_bytes'] / 1e6:.2f} MB"
        out.append(line + (f"; {benches}" if benches else ""))
    return out
