"""`vitq-edge bench`: latency, instructions per inference, peak memory and size of a .pte on a device.

The runner times `runs` forward calls on its deterministic synthetic image (the cost of a
ViT does not depend on the pixel values, and no data set is needed), after `warmup`
untimed ones. On emulated devices the qemu plugin also counts the instructions of each
timed inference: the number that ranks programs, since emulated wall time does not.
A build folder's result is appended to its manifest under `benchmarks`.

With `profile`, a second run of the same calls records ExecuTorch's ETDump (vitq_edge.profile):
the timed numbers above come from the untraced run, so the tracer never changes them (nor
the emulated instruction counts), and the profile says how much it slowed its own run.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from vitq_edge.artifacts import (
    append_to_manifest,
    check_arithmetic,
    file_sha256,
    is_build_manifest,
    locate_program,
    read_manifest,
)
from vitq_edge.device import RunRequest, get_device
from vitq_edge.errors import VitqError
from vitq_edge.hostinfo import host_description
from vitq_edge.progress import steps

DEFAULT_RUNS = 10
EMULATED_RUNS = 3  # every inference costs ~200x its native time under qemu; the counts repeat exactly
# More threads than cores only makes a program wait for itself; past this many per core a
# --threads value is a typo, not a measurement.
MAX_THREADS_PER_CORE = 4
RUNNER_MAX_THREADS = 256  # vitq-runner refuses more
# The runner's "gemm" (libvitq_kernels.so's vitq_gemm) as bench prints it, for programs with vitq:: ops.
GEMM_NAMES = {
    "pairs": "ours, pairs packing (NEON smull/smlal2 on aarch64)",
    "dot": "ours, dot packing (NEON sdot on aarch64)",
    "vnni": "ours, AVX-VNNI vpdpbusd",
    "vnni-evex": "ours, AVX512-VNNI vpdpbusd",
    "xnnpack": "XNNPACK's qd8_f32_qc8w, int16 attention codes",
}


def check_threads(threads: int, cores: int | None, device: str) -> str | None:
    """Refuse absurd --threads; a note (to print and record) when it oversubscribes the device's cores."""
    limit = RUNNER_MAX_THREADS if cores is None else min(RUNNER_MAX_THREADS, MAX_THREADS_PER_CORE * cores)
    if threads > limit:
        has = f"{device} has {cores} cores" if cores else f"vitq-runner takes at most {RUNNER_MAX_THREADS}"
        raise VitqError(f"--threads {threads} is far more than the device can run ({has}); use at most "
                        f"{cores or RUNNER_MAX_THREADS} (or 0: one per core)")
    if cores is not None and threads > cores:
        return (f"--threads {threads} is more than the {cores} cores of {device}: threads wait for one another and "
                "the latency is not what the device gives with one thread per core")
    return None


def resolve_program(path: str | Path) -> tuple[Path, Path | None]:
    """A build folder or a .pte -> (program, the manifest that describes it, if any)."""
    pte, manifest_path = locate_program(path)
    try:
        found = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    except (OSError, ValueError):
        found = None
    # Only a build manifest written with this very program describes it; checked whole before
    # anything is appended to it.
    if not isinstance(found, dict) or not is_build_manifest(found) or found.get("program") != pte.name:
        return pte, None
    check_arithmetic(read_manifest(manifest_path), path)
    return pte, manifest_path


def benchmark(path: str | Path, device: str = "host", runs: int | None = None, warmup: int = 1, threads: int = 1,
              timeout: float | None = None, record: bool = True, profile: bool = False) -> dict:
    """Run the program at `path` on `device`; append the result to its build's manifest when `record`.

    With `profile`, also run it under ExecuTorch's event tracer: the result gets "profile" (see
    vitq_edge.profile.summarize) and the raw ETDump is saved as profile-<device>.etdp beside the program.
    """
    pte, manifest = resolve_program(path)
    dev = get_device(device)
    check_threads(threads, dev.cores, dev.name)  # before connecting, where the cores are known already
    runs = runs or (EMULATED_RUNS if dev.emulated else DEFAULT_RUNS)
    req = RunRequest(warmup=warmup, runs=runs, threads=threads, count_instructions=dev.emulated, timeout=timeout)
    traced = None
    with steps(f"benchmarking on {dev.name}", 3 if profile else 2) as done:
        with dev.session(pte) as session:
            done("ready")
            oversubscribed = check_threads(threads, dev.cores, dev.name)
            result = session.run(req)
            uses_kernels = session.uses_kernels
            done("ran")
            if profile:
                traced = session.run(RunRequest(warmup=warmup, runs=runs, threads=threads, etdump=True,
                                                timeout=timeout))
                done("profiled")
    rep = result.report
    instructions = result.instructions
    entry = {
        "device": dev.name,
        "device_info": dev.describe(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "input": "synthetic (the runner's deterministic image)",
        "input_shape": rep.get("input_shape"),
        "warmup": warmup,
        "runs": runs,
        "threads": rep.get("threads", threads),
        "latency_ms": rep["latency_ms"],
        "latency_is_emulated": dev.emulated,
        "load_ms": rep.get("load_ms"),
        "peak_rss_mb": rep.get("peak_rss_mb"),
        "peak_rss_includes_emulator": dev.emulated,
        "instructions_per_inference": instructions["per_inference"] if instructions else None,
        "instructions": instructions,
        "size_bytes": pte.stat().st_size,
        "pte_sha256": file_sha256(pte),
        "detected_cpu": rep.get("cpu"),
        # The int8 GEMM our kernels ran (runtime/README.md); none for a program without vitq:: ops.
        "kernels_gemm": rep.get("gemm") if uses_kernels else None,
        "runner_version": rep.get("version"),
        "host": host_description(),
        "notes": ([oversubscribed] if oversubscribed else []) + result.notes,
    }
    # Before recording: a profile that cannot be read fails the command with the manifest untouched.
    prof = None if traced is None else _profile(traced, pte, dev.name, dev.emulated, rep["latency_ms"]["median"])
    if not record:
        recorded = "not recorded (--no-record)"
    elif manifest is None:
        recorded = "not recorded (no build manifest beside the .pte)"
    else:
        index = append_to_manifest(manifest, "benchmarks", entry)
        recorded = f"recorded in {manifest} (benchmarks[{index}])"
    out = {**entry, "program": str(pte), "recorded": recorded}
    if prof is not None:
        out["profile"] = prof
    return out


def _profile(traced, pte: Path, device: str, emulated: bool, untraced_median: float) -> dict:
    from vitq_edge.profile import etdump_path, save_etdump, summarize

    summary = summarize(traced.etdump, pte)
    target = etdump_path(pte, device)
    try:
        save_etdump(traced.etdump, target)
        saved = str(target)
    except (OSError, VitqError) as exc:  # the profile itself is still printed
        saved = f"not saved ({exc})"
    traced_median = traced.report["latency_ms"]["median"]
    return {
        **summary,
        "etdump": saved,
        "etdump_bytes": len(traced.etdump),
        "latency_is_emulated": emulated,
        "traced_latency_ms": traced.report["latency_ms"],
        "untraced_median_ms": untraced_median,
        "tracer_overhead_pct": round(100.0 * (traced_median / untraced_median - 1), 1) if untraced_median else None,
    }


def format_bench(r: dict, top: int | None = None) -> str:
    """The human-readable summary the CLI prints."""
    lat = r["latency_ms"]
    info = r["device_info"]
    where = info.get("board") or info.get("cpu") or r["device"]
    threads = f"{r['threads']} thread{'s' if r['threads'] != 1 else ''}"
    lines = [f"{r['program']} ({r['size_bytes'] / 1e6:.2f} MB) on {r['device']} ({where})"]
    ins = r["instructions"]
    if ins:
        spread = "" if ins["min"] == ins["max"] else f", min {ins['min']:,} max {ins['max']:,}"
        lines.append(f"  instructions  {ins['per_inference']:,} per inference "
                     f"({'exact' if ins['exact'] else 'approximate'}, {ins['inferences']} inferences{spread})")
        if ins.get("method") == "critical path":
            pad = " " * 16
            lines.append(f"{pad}= the critical path of {ins['threads']} threads: serial {ins['serial']:,} + the "
                         f"busiest thread in each of {ins['regions']} parallel regions ({ins['tasks']:,} pool tasks)")
            lines.append(f"{pad}work on all threads {ins['work']:,} ({ins['work'] / ins['per_inference']:.2f}x the "
                         f"critical path); the pool's own {ins['pool']:,} (waiting, scheduling) left out")
    kind = "emulated wall time, not the board's" if r["latency_is_emulated"] else "wall time"
    lines.append(f"  latency       median {lat['median']:.2f} ms, min {lat['min']:.2f}, p90 {lat['p90']:.2f}, "
                 f"mean {lat['mean']:.2f} ({r['runs']} runs after {r['warmup']} warmup, {threads}; {kind})")
    if r.get("kernels_gemm"):
        lines.append(f"  int8 GEMM     {GEMM_NAMES.get(r['kernels_gemm'], r['kernels_gemm'])}")
    if r.get("load_ms") is not None:
        lines.append(f"  load          {r['load_ms']:.1f} ms")
    if r.get("peak_rss_mb") is not None:
        lines.append(f"  peak memory   {r['peak_rss_mb']:.1f} MB RSS" +
                     (" (includes the emulator)" if r["peak_rss_includes_emulator"] else ""))
    lines += [f"note: {n}" for n in r["notes"]]
    lines.append(r["recorded"])
    if r.get("profile"):
        from vitq_edge.profile import DEFAULT_TOP, format_profile

        lines += format_profile(r["profile"], top or DEFAULT_TOP)
    return "\n".join(lines)
