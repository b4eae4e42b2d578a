"""What every device shares: the Device and Session interfaces, one run's request and result, errors.

A device runs `vitq-runner` (runtime/README.md) on a `.pte` and float32 `.npy` inputs.
The runner prints one JSON report on stdout (latency, load time, peak RSS, the CPU that
XNNPACK detected) and, with `--out`, writes the program's outputs as `.npy`; on any error
it prints one `vitq-runner: error: ...` line and exits 2. Devices differ only in how
they launch it (directly, under qemu, over SSH) and where the files live.
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vitq_edge.errors import VitqError
from vitq_edge.lifetime import guarded, owned_temp_dir
from vitq_edge.runtime import ARITHMETIC_VERSION, RUNNER, Bundle, build_hint, find_bundle, program_custom_ops


@dataclass(frozen=True)
class RunRequest:
    """One runner invocation on the session's program."""

    inputs: Sequence[Path] = ()  # float32 .npy files; none: the runner's deterministic synthetic image
    warmup: int = 1
    runs: int = 1
    threads: int = 1  # 0: the runtime's default (one per performance core)
    outputs: bool = False  # bring the program's output (logits) back as an array
    count_instructions: bool = False  # emulated devices only
    etdump: bool = False  # profile: the runner records an ETDump of the timed calls (RunResult.etdump)
    timeout: float | None = None  # seconds for the whole run


@dataclass
class RunResult:
    report: dict  # the runner's JSON report
    output: np.ndarray | None = None
    instructions: dict | None = None  # see `instruction_summary`
    etdump: bytes | None = None  # the runner's ETDump file, with RunRequest.etdump
    notes: list[str] = field(default_factory=list)


ETDUMP_FILE = "profile.etdp"  # the runner's --etdump file, in a run's temporary folder


def runner_args(pte: str, inputs: Sequence[str], req: RunRequest, out: str | None,
                etdump: str | None = None) -> list[str]:
    args = ["--warmup", str(req.warmup), "--runs", str(req.runs), "--threads", str(req.threads)]
    if out is not None:
        args += ["--out", out]
    if etdump is not None:
        args += ["--etdump", etdump]
    return [*args, "--", pte, *inputs]


def runner_error_line(stderr: str) -> str | None:
    """The runner's own one-line error, if it printed one."""
    for line in reversed(stderr.splitlines()):
        if line.startswith(f"{RUNNER}:"):
            return line.removeprefix(f"{RUNNER}:").strip().removeprefix("error:").strip()
    return None


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def raise_runner_failure(stderr: str, code: int, where: str, pte_label: str) -> None:
    """Turn a failed runner (or launcher) into one VitqError line."""
    message = runner_error_line(stderr)
    if message is not None:
        if "unknown option --etdump" in message:
            raise VitqError(f"the runner bundle on {where} predates --profile (its vitq-runner has no --etdump); "
                            f"rebuild it: {build_hint()}")
        if "loading program" in message or "load_method" in message:
            raise VitqError(f"{pte_label} is not a loadable ExecuTorch program on {where} ({message}); "
                            "rebuild it with `vitq-edge build`")
        raise VitqError(f"the runner failed on {where}: {message}")
    detail = last_line(stderr) or (f"killed by signal {-code}" if code < 0 else f"exit code {code}")
    raise VitqError(f"the runner failed on {where}: {detail}")


def program_uses_kernels(pte: Path) -> bool:
    """Whether a program calls vitq:: ops, i.e. computes our integer arithmetic on the device."""
    return bool(program_custom_ops(Path(pte).read_bytes()))


def parse_report(stdout: str, stderr: str, code: int, where: str, pte_label: str, *,
                 bundle: str, uses_kernels: bool) -> dict:
    """The runner's report; a runner whose kernels compute another integer arithmetic than this
    vitq-edge is refused for a program that uses them (it would run, with other bits)."""
    if code != 0:
        raise_runner_failure(stderr, code, where, pte_label)
    try:
        report = json.loads(stdout.strip().splitlines()[-1])
        report["latency_ms"]  # noqa: B018 - the field every caller reads
    except (IndexError, ValueError, KeyError, TypeError):
        raise VitqError(f"the runner on {where} printed no report ({last_line(stderr) or 'no output'}); "
                        f"is the bundle a vitq-runner? {build_hint()}") from None
    arithmetic = report.get("arithmetic_version")
    if uses_kernels and arithmetic != ARITHMETIC_VERSION:
        computes = "an unknown integer arithmetic (it predates versions)" if arithmetic is None else \
            f"integer arithmetic {arithmetic}"
        raise VitqError(f"the runner bundle on {where} computes {computes} and this vitq-edge "
                        f"{ARITHMETIC_VERSION}; rebuild the bundle: {build_hint(bundle)}")
    return report


def run_local(cmd: list[str], timeout: float | None, where: str,
              timeout_message: str | None = None) -> subprocess.CompletedProcess:
    """Run a local command; a timeout or a missing executable becomes a VitqError.

    The command runs under `lifetime.guarded` (it dies with this process, even on SIGKILL),
    in its own process group, so a timeout or Ctrl-C stops the whole tree (shell, qemu,
    runner). The guard's shell also keeps this (large) process's peak RSS out of the
    runner's getrusage report.
    """
    if shutil.which(cmd[0]) is None:
        raise VitqError(f"cannot start {cmd[0]} for {where} (not found or not executable)")
    try:
        proc = subprocess.Popen(guarded(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True, errors="replace", start_new_session=True)
    except OSError as exc:
        raise VitqError(f"cannot start {shlex.quote(cmd[0])} for {where} ({exc.strerror})") from None
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except BaseException as exc:  # the timeout, Ctrl-C or SIGTERM: do not leave the runner behind
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        if isinstance(exc, subprocess.TimeoutExpired):
            raise VitqError(timeout_message or f"the run on {where} took longer than --timeout {timeout:g} s and "
                            "was stopped; raise --timeout or use fewer --runs/--limit") from None
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _middle(values: list[int]) -> int:
    """The middle value (the upper one of an even count): always one that was measured."""
    return sorted(values)[len(values) // 2]


def instruction_summary(counts: dict, warmup: int, threads: int) -> dict:
    """The insn_count plugin's report -> per-inference counts of the timed forward calls.

    The runner marks every forward call, warmup calls first, so the first `warmup`
    spans are dropped. `threads` is the pool size the runner ran with. With one
    thread the cost is the thread's instruction count. With more, the plugin ran in
    its schedule mode and the cost is the modelled critical path: the main thread's
    serial work plus, per parallel region, the busiest of `threads` equal threads
    given the region's tasks (runtime/qemu_plugin/README.md); the pool's waiting is
    left out, and "work" is every thread's work without it.
    """
    schedule = counts.get("schedule")
    if schedule:
        timed = list(schedule.get("spans", []))[warmup:]
        spans = [int(s["critical_path"]) for s in timed]
    else:
        timed = []
        spans = [int(s) for s in counts.get("spans", [])][warmup:]
    if not spans:
        raise VitqError("the instruction counter saw no complete inference; is the runner the one from "
                        f"runtime/ (it marks each forward call)? {build_hint('aarch64')}")
    summary = {
        # The median: with one thread a run's inferences differ by at most a few hundred
        # instructions (allocator paths), and the same command repeats them exactly.
        "per_inference": _middle(spans),
        "min": min(spans),
        "max": max(spans),
        "inferences": len(spans),
        "threads": threads,
        # The inline counter (one thread) is shared by all guest threads in qemu 7.2: exact
        # when one thread runs inferences. The schedule mode counts each thread apart.
        "exact": bool(counts.get("exact", threads == 1)) and (threads == 1 or bool(schedule)),
        "method": "critical path" if schedule else "one thread",
        "guest_threads": counts.get("threads_created"),
        "counter": f"qemu plugin {counts.get('plugin', '?')} (format {counts.get('format', '?')})",
    }
    if schedule:
        summary["work"] = _middle([int(s["serial"]) + int(s["task_work"]) for s in timed])
        for key, field in (("serial", "serial"), ("pool", "pool"), ("tasks", "tasks"), ("regions", "regions"),
                           ("busiest_thread_emulated", "busiest_thread"), ("untracked", "untracked")):
            summary[key] = _middle([int(s[field]) for s in timed])
    return summary


def load_etdump(path: Path, where: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError:
        data = b""
    if not data:
        raise VitqError(f"the runner on {where} wrote no ETDump for --profile; rebuild the runner bundle: "
                        f"{build_hint()}")
    return data


def load_output(path: Path, where: str) -> np.ndarray:
    try:
        return np.load(path)
    except (OSError, ValueError) as exc:
        raise VitqError(f"cannot read the program output from {where} ({exc}); rerun, or rebuild the "
                        f"runner bundle: {build_hint()}") from None


class Session(abc.ABC):
    """A program made ready on a device; `run` may be called many times."""

    uses_kernels: bool  # whether the program calls vitq:: ops (program_uses_kernels)

    @abc.abstractmethod
    def run(self, req: RunRequest) -> RunResult: ...


class Device(abc.ABC):
    """Where a `.pte` runs. `session(pte)` readies the bundle and program once for many runs."""

    name: str  # as given to --device
    emulated: bool = False
    cores: int | None = None  # CPU cores the runner can use there (None: unknown, e.g. before connecting)

    @abc.abstractmethod
    def describe(self) -> dict:
        """What the device is, for reports: kind, CPU, how it is reached."""

    @abc.abstractmethod
    def session(self, pte: Path) -> contextlib.AbstractContextManager[Session]: ...


class LocalDevice(Device):
    """A device on this machine: the runner reads the program and inputs in place."""

    bundle_name = "host"

    def prepare(self) -> None:
        """Check what the launcher needs (before any run), raising VitqError."""

    def launcher(self, counts_path: Path | None, threads: int) -> list[str]:
        """The command words before the runner's path (none: run it directly)."""
        return []

    def read_counts(self, counts_path: Path | None, req: RunRequest, result: RunResult) -> None:
        if req.count_instructions:
            result.notes.append(f"instruction counts are measured on emulated devices only, not on {self.name}")

    def explain_failure(self, stderr: str) -> str | None:
        """A launcher's own error (not the runner's), as a message; None if it is the runner's."""
        return None

    @contextlib.contextmanager
    def session(self, pte: Path) -> Iterator[Session]:
        bundle = find_bundle(self.bundle_name)
        self.prepare()
        yield _LocalSession(self, bundle, Path(pte))


class _LocalSession(Session):
    def __init__(self, device: LocalDevice, bundle: Bundle, pte: Path):
        self.device, self.bundle, self.pte = device, bundle, pte
        self.uses_kernels = program_uses_kernels(pte)

    def run(self, req: RunRequest) -> RunResult:
        with owned_temp_dir("vitq-run-") as tmp:
            out = Path(tmp) / "output.npy" if req.outputs else None
            counts = Path(tmp) / "insn.json" if req.count_instructions else None
            etdump = Path(tmp) / ETDUMP_FILE if req.etdump else None
            cmd = [*self.device.launcher(counts, req.threads), str(self.bundle.runner),
                   *runner_args(str(self.pte), [str(p) for p in req.inputs], req, None if out is None else str(out),
                                None if etdump is None else str(etdump))]
            proc = run_local(cmd, req.timeout, self.device.name)
            if proc.returncode != 0 and runner_error_line(proc.stderr) is None:
                message = self.device.explain_failure(proc.stderr)
                if message:
                    raise VitqError(message)
            report = parse_report(proc.stdout, proc.stderr, proc.returncode, self.device.name, str(self.pte),
                                  bundle=self.bundle.name, uses_kernels=self.uses_kernels)
            result = RunResult(report, output=None if out is None else load_output(out, self.device.name),
                               etdump=None if etdump is None else load_etdump(etdump, self.device.name))
            self.device.read_counts(counts, req, result)
            return result
