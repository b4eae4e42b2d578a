"""Bounded fuzzing of the files vitq-edge is handed: .npy inputs and .pte programs (run by the
AddressSanitizer build of vitq-runner) and images (read by `vitq_edge.data.datasets.read_image`).

Each case is one deterministic mutation of a small valid file: its seed is its case number, so
a failure is reproducible from the seed alone, and its file is kept under the test's tmp_path.
Each test stops starting new cases at its own deadline (the budgets below), which keeps the
whole module under a minute on two cores; a faster machine runs more cases, up to MAX_CASES.

What a case must do:
  runner  exit 0, or exit 2 with one `vitq-runner: error:` line; never a signal (SIGABRT
          included), another exit code or an AddressSanitizer/LeakSanitizer report.
  images  return an image or raise VitqError; never another exception, a signal or an abort
          (read in a separate interpreter, so a crash in a decoder is seen as a signal).
"""

from __future__ import annotations

import io
import os
import random
import re
import signal
import struct
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from vitq_edge.runtime import runtime_dir

from .conftest import REPO

ASAN_RUNNER = runtime_dir() / "host-asan" / "bin" / "vitq-runner"
needs_asan_runner = pytest.mark.skipif(
    not ASAN_RUNNER.is_file(),
    reason=f"no AddressSanitizer runner at {ASAN_RUNNER} (bash tools/build_runtime.sh asan)")

# Seconds each test may start new cases for (the last ones then finish), and a cap on cases.
NPY_BUDGET_S, PTE_BUDGET_S, IMAGE_BUDGET_S = 12.0, 18.0, 8.0
MAX_CASES = 4000  # so that a fast machine does not run far more (and other) cases than a slow one
IMAGE_CASES = 8000  # generated up front; the reader takes well under a millisecond each
MIN_CASES = 100  # fewer in the budget means the harness itself is broken or the machine stalled
WORKERS = min(os.cpu_count() or 1, 4)

# allocator_may_return_null: a corrupt size makes malloc return NULL, as glibc's does, instead
# of ASan aborting on the request; the program then has to handle it. Leak checking stays on.
ASAN_ENV = {**os.environ, "ASAN_OPTIONS": "allocator_may_return_null=1"}
SANITIZER_REPORT = re.compile(r"ERROR: \w+Sanitizer")  # not the "WARNING: ... failed to allocate" lines

# ExecuTorch 1.5 itself crashes on some corrupt programs, where the runner cannot step in: its
# program verification checks the flatbuffer's structure, not what the fields mean. Found so far:
# the XNNPACK delegate trusts its payload (tensor dims, constant offsets: SIGSEGV/SIGBUS in
# xnn_create_convolution2d_nhwc_f32, ...) and the delegate call's argument list
# (XNNExecutor::prepare_args), and BackendDelegate::Init dereferences a missing field. The
# shipped, unsanitized runner dies of the same signals. A SIGSEGV/SIGBUS whose innermost frame
# outside libc and the sanitizer is in one of these libraries is reported as a warning with its
# seed instead of failing the test; remove a library here to make its crashes fail again (after
# an ExecuTorch upgrade, say). Any other sanitizer report, abort or signal still fails.
UPSTREAM_CRASH_LIBS = ("libexecutorch.so", "libexecutorch_backend_xnnpack.so")
SYSTEM_FRAME = re.compile(r"libsanitizer|libasan|sysdeps/|/lib(?:c|m|gcc_s|stdc\+\+|pthread)\.so")


@dataclass
class Outcome:
    seed: int
    mutation: str
    failure: str | None = None  # why the case fails the test
    upstream: str | None = None  # a tolerated crash in UPSTREAM_CRASH_LIBS


# --- valid inputs ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pte(tmp_path_factory) -> Path:
    """A tiny program delegated to XNNPACK (conv, relu, mean, linear) taking [1, 3, 8, 8]."""
    import torch
    from vitq_edge.lower.export import lower_to_executorch

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.fc = torch.nn.Linear(4, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    torch.manual_seed(0)
    program = lower_to_executorch(Tiny().eval(), (torch.randn(1, 3, 8, 8),))
    path = tmp_path_factory.mktemp("fuzz") / "tiny.pte"
    path.write_bytes(program.buffer)
    return path


def npy_bytes(array: np.ndarray, version: tuple[int, int] | None = None) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, version=version)
    return buf.getvalue()


_rng = np.random.default_rng(0)
VALID_NPY = [npy_bytes(_rng.random((1, 3, 8, 8), dtype=np.float32)),
             npy_bytes(_rng.random((3, 3, 8, 8), dtype=np.float32)),  # a batch of three
             npy_bytes(_rng.random((3, 8, 8), dtype=np.float32), version=(2, 0)),
             npy_bytes(_rng.random((1, 3, 8, 8), dtype=np.float32), version=(3, 0))]


# --- running the sanitized runner --------------------------------------------------------------
def runner_failure(proc: subprocess.CompletedProcess) -> str | None:
    """Why a vitq-runner run breaks its contract, or None."""
    code, err = proc.returncode, proc.stderr
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    if SANITIZER_REPORT.search(err):
        return "sanitizer report"
    if code == 0:
        return None
    error_lines = [line for line in err.splitlines() if line.startswith("vitq-runner: error:")]
    if code == 2 and len(error_lines) == 1:
        return None
    return f"exit code {code}" + ("" if error_lines else " without a `vitq-runner: error:` line")


def stderr_excerpt(stderr: str) -> str:
    """A sanitizer report's headline and innermost frames, else the end of stderr."""
    report = SANITIZER_REPORT.search(stderr)
    if report is None:
        return stderr[-1000:]
    lines = stderr[report.start():].splitlines()
    return "\n".join([lines[0], *[line for line in lines[1:] if line.lstrip().startswith("#")][:8]])


def upstream_crash(stderr: str) -> str | None:
    """The crash, if it is a SIGSEGV/SIGBUS inside UPSTREAM_CRASH_LIBS."""
    report = re.search(r"ERROR: AddressSanitizer: (SEGV|BUS) ", stderr)
    if not report:
        return None
    for frame in re.findall(r"^\s*#\d+ 0x[0-9a-f]+ (.*)$", stderr[report.start():], re.MULTILINE):
        if SYSTEM_FRAME.search(frame):
            continue
        module = re.search(r"\(([^()\s]+)\+0x[0-9a-f]+\)$", frame)  # unsymbolized: (path+offset)
        if module and Path(module.group(1)).name in UPSTREAM_CRASH_LIBS:
            return f"{report.group(1)} in {Path(module.group(1)).name}: {frame[:160]}"
        return None
    return None


def fuzz_runner(case_dir: Path, suffix: str, mutate: Callable[[random.Random], tuple[bytes, str]],
                argv: Callable[[int, Path], list[str]], budget_s: float) -> list[Outcome]:
    """Run cases 0, 1, ... until the budget is spent; a case's file is kept when it fails."""
    case_dir.mkdir(parents=True, exist_ok=True)

    def run_case(seed: int) -> Outcome:
        data, mutation = mutate(random.Random(seed))
        path = case_dir / f"case{seed}{suffix}"
        path.write_bytes(data)
        proc = subprocess.run([str(ASAN_RUNNER), *argv(seed, path)], capture_output=True, text=True,
                              errors="replace", env=ASAN_ENV, timeout=60)
        outcome = Outcome(seed, mutation, runner_failure(proc))
        if outcome.failure and (crash := upstream_crash(proc.stderr)):
            outcome.failure, outcome.upstream = None, crash
        if outcome.failure:
            outcome.failure += f"; stderr: {stderr_excerpt(proc.stderr)}"
        else:
            path.unlink()
        return outcome

    return run_bounded(run_case, budget_s)


def run_bounded(run_case: Callable[[int], Outcome], budget_s: float) -> list[Outcome]:
    deadline = time.monotonic() + budget_s
    outcomes: list[Outcome] = []
    with ThreadPoolExecutor(WORKERS) as pool:
        pending: set = set()
        seed = 0
        while seed < MAX_CASES and time.monotonic() < deadline:
            pending.add(pool.submit(run_case, seed))
            seed += 1
            if len(pending) >= 2 * WORKERS:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                outcomes += [f.result() for f in done]
        outcomes += [f.result() for f in pending]
    return sorted(outcomes, key=lambda o: o.seed)


def check(outcomes: list[Outcome], case_dir: Path, what: str) -> None:
    assert len(outcomes) >= MIN_CASES, f"only {len(outcomes)} {what} cases ran in the budget"
    failed = [o for o in outcomes if o.failure]
    assert not failed, (f"{len(failed)} of {len(outcomes)} {what} cases failed (files kept in {case_dir}):\n"
                        + "\n".join(f"seed {o.seed} ({o.mutation}): {o.failure}" for o in failed[:5]))
    upstream = [o for o in outcomes if o.upstream]
    if upstream:
        warnings.warn(f"{len(upstream)} of {len(outcomes)} {what} cases crashed ExecuTorch itself "
                      f"(UPSTREAM_CRASH_LIBS), not the runner: "
                      + "; ".join(f"seed {o.seed} ({o.mutation}): {o.upstream}" for o in upstream[:5]),
                      stacklevel=2)


# --- mutations shared by every file kind -------------------------------------------------------
def flip_bytes(rng: random.Random, data: bytes, span: int, most: int, kind: str) -> tuple[bytes, str]:
    """1..`most` random bytes among the first `span` set to random values."""
    out = bytearray(data)
    at = sorted(rng.randrange(span) for _ in range(rng.randint(1, most)))
    for i in at:
        out[i] = rng.randrange(256)
    return bytes(out), f"{kind} at {at}"


def truncate(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    n = rng.randrange(len(data))
    return data[:n], f"truncated to {n} bytes"


def splice(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """1..64 bytes of the file copied over another place in it."""
    n, src, dst = rng.randint(1, 64), rng.randrange(len(data)), rng.randrange(len(data))
    out = bytearray(data)
    out[dst:dst + n] = data[src:src + n]
    return bytes(out), f"{n} bytes from {src} copied over {dst}"


# --- .npy mutations ---------------------------------------------------------------------------
SHAPES = ["()", "(0,)", "(0, 3, 8, 8)", "(2, 3, 8, 8)", "(3, 8, 8)", "(1, 3, 8, 8, 1)", "(-1, 3, 8, 8)",
          "(9223372036854775807, 3, 8, 8)", "(4611686018427387904, 4)", "(18446744073709551615,)",
          "(1, 3, 8, 99999999999999999999999)", "(1L, 3L, 8L, 8L)", "(L,)", "(1,,3)", "(1 3 8 8)", "(",
          "(1, 3, 8, 8,)", "(65536, 65536, 65536)"]
DESCRS = ["<f4", ">f4", "<f8", "|u1", "<f2", "", "'", "<f4\x00", "O", "<f4', 'x': '"]
HEADER_JUNK = ["'", ":", "(", ")", ",", "{", "}", "\x00", "\n", "'shape':", "'descr':", "'fortran_order':"]


def split_npy(data: bytes) -> tuple[int, str, bytes]:
    """(width of the header-length field, header text, array data) of a valid .npy."""
    width = 2 if data[6] == 1 else 4
    length = int.from_bytes(data[8:8 + width], "little")
    return width, data[8 + width:8 + width + length].decode("latin1"), data[8 + width + length:]


def join_npy(data: bytes, width: int, header: str, body: bytes, length: int | None = None) -> bytes:
    raw = header.encode("latin1")
    length = len(raw) if length is None else length
    return data[:8] + length.to_bytes(width, "little") + raw + body


def mutate_npy(rng: random.Random) -> tuple[bytes, str]:
    data = rng.choice(VALID_NPY)
    width, header, body = split_npy(data)
    kind = rng.choice(["shape", "descr", "fortran", "header-edit", "header-length", "version",
                       "flip-header", "flip", "truncate", "append"])
    if kind == "shape":
        shape = rng.choice(SHAPES)
        header = re.sub(r"'shape': \([^)]*\)", lambda _: f"'shape': {shape}", header)
        return join_npy(data, width, header, body), f"shape {shape}"
    if kind == "descr":
        descr = rng.choice(DESCRS)
        return join_npy(data, width, header.replace("'<f4'", f"'{descr}'"), body), f"descr {descr!r}"
    if kind == "fortran":
        return join_npy(data, width, header.replace("False", "True"), body), "fortran_order True"
    if kind == "header-edit":
        at = rng.randrange(len(header))
        if rng.random() < 0.5:
            n = rng.randint(1, 12)
            return join_npy(data, width, header[:at] + header[at + n:], body), f"header: {n} chars cut at {at}"
        junk = rng.choice(HEADER_JUNK)
        return join_npy(data, width, header[:at] + junk + header[at:], body), f"header: {junk!r} inserted at {at}"
    if kind == "header-length":
        length = rng.choice([0, 1, len(header) - 1, len(header) + 1, 0xFFFF, 1 << 20, (1 << 20) + 1, 0xFFFFFFFF])
        length &= (1 << (8 * width)) - 1
        return join_npy(data, width, header, body, length), f"header length {length}"
    if kind == "version":
        major = rng.choice([0, 2, 3, 4, 255]) if data[6] == 1 else rng.choice([0, 1, 4, 255])
        return data[:6] + bytes([major]) + data[7:], f"version byte {major}"
    if kind in ("flip-header", "flip"):
        span = min(len(data), 8 + width + len(header)) if kind == "flip-header" else len(data)
        return flip_bytes(rng, data, span, 6, kind)
    if kind == "truncate":
        return truncate(rng, data)
    n = rng.randint(1, 8)
    return data + bytes(rng.randrange(256) for _ in range(n)), f"{n} bytes appended"


# --- .pte mutations ---------------------------------------------------------------------------
def pte_mutator(valid: bytes) -> Callable[[random.Random], tuple[bytes, str]]:
    # Sizes and offsets a flatbuffer or the extended header might hold, and their off-by-ones.
    words = [0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, len(valid) - 1,
             len(valid), len(valid) + 1, len(valid) // 2]

    def mutate(rng: random.Random) -> tuple[bytes, str]:
        out = bytearray(valid)
        kind = rng.choice(["flip", "flip-head", "word", "truncate", "splice", "insert", "delete"])
        if kind in ("flip", "flip-head"):
            # head: root offset, magic, extended header
            return flip_bytes(rng, valid, 64 if kind == "flip-head" else len(valid), 8, kind)
        if kind == "word":
            at, value = rng.randrange(len(out) // 4) * 4, rng.choice(words)
            out[at:at + 4] = struct.pack("<I", value)
            return bytes(out), f"u32 at {at} = {value:#x}"
        if kind == "truncate":
            return truncate(rng, valid)
        if kind == "splice":
            return splice(rng, valid)
        n, dst = rng.randint(1, 64), rng.randrange(len(out))
        if kind == "insert":
            out[dst:dst] = bytes(rng.randrange(256) for _ in range(n))
            return bytes(out), f"{n} random bytes inserted at {dst}"
        del out[dst:dst + n]
        return bytes(out), f"{n} bytes deleted at {dst}"

    return mutate


# --- the runner --------------------------------------------------------------------------------
@needs_asan_runner
def test_sanitized_runner_runs_the_valid_inputs(pte, tmp_path):
    """The baseline: without it every mutation would 'pass' as an error."""
    inputs = []
    for i, data in enumerate(VALID_NPY):
        inputs.append(tmp_path / f"valid{i}.npy")
        inputs[-1].write_bytes(data)
    proc = subprocess.run([str(ASAN_RUNNER), str(pte), *map(str, inputs)], capture_output=True, text=True,
                          errors="replace", env=ASAN_ENV, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-3000:]
    assert '"num_images": 6' in proc.stdout, proc.stdout  # [1,3,8,8] + [3,3,8,8] + [3,8,8] + [1,3,8,8]


@needs_asan_runner
def test_npy_reader_survives_corrupt_inputs(pte, tmp_path):
    cases = tmp_path / "cases"
    outcomes = fuzz_runner(cases, ".npy", mutate_npy, lambda seed, path: [str(pte), str(path)], NPY_BUDGET_S)
    check(outcomes, cases, ".npy")
    assert not any(o.upstream for o in outcomes), "a corrupt .npy must not even reach ExecuTorch's crash sites"


@needs_asan_runner
def test_program_loading_survives_corrupt_programs(pte, tmp_path):
    valid_input = tmp_path / "input.npy"
    valid_input.write_bytes(VALID_NPY[0])
    cases = tmp_path / "cases"

    def argv(seed: int, path: Path) -> list[str]:
        # Odd seeds feed a file, even ones the runner's synthetic input, which is sized from the
        # (possibly corrupt) input shape the program states.
        return [str(path), str(valid_input)] if seed % 2 else [str(path)]

    check(fuzz_runner(cases, ".pte", pte_mutator(pte.read_bytes()), argv, PTE_BUDGET_S), cases, ".pte")


# --- images -------------------------------------------------------------------------------------
def valid_images() -> dict[str, bytes]:
    """Small valid files of each format read_image meets, keyed by a name ending in the suffix."""
    pixels = np.random.default_rng(1).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    images = {}
    for name, fmt, mode, options in [
        ("rgb.png", "PNG", "RGB", {}), ("palette.png", "PNG", "P", {}),
        ("baseline.jpg", "JPEG", "RGB", {"quality": 80}), ("progressive.jpg", "JPEG", "L", {"progressive": True}),
        ("anim.gif", "GIF", "P", {}), ("rgb.bmp", "BMP", "RGB", {}),
        ("raw.tif", "TIFF", "RGB", {}), ("deflate.tif", "TIFF", "RGB", {"compression": "tiff_deflate"}),
        ("lossy.webp", "WEBP", "RGB", {"quality": 80}), ("lossless.webp", "WEBP", "RGBA", {"lossless": True}),
    ]:
        buf = io.BytesIO()
        Image.fromarray(pixels).convert(mode).save(buf, fmt, **options)
        images[name] = buf.getvalue()
    return images


def length_fields(name: str, data: bytes) -> list[tuple[int, int, str]]:
    """(offset, width, byte order) of the structure's length fields: PNG chunks, JPEG segments
    before the scan, RIFF chunks of WEBP; for other formats the fixed header's 2- and 4-byte words."""
    fields = []
    if name.endswith(".png"):
        at = 8
        while at + 8 <= len(data):
            fields.append((at, 4, "big"))
            at += 12 + int.from_bytes(data[at:at + 4], "big")
    elif name.endswith(".jpg"):
        at = 2
        while at + 4 <= len(data) and data[at] == 0xFF and data[at + 1] != 0xDA:
            fields.append((at + 2, 2, "big"))
            at += 2 + int.from_bytes(data[at + 2:at + 4], "big")
    elif name.endswith(".webp"):
        fields.append((4, 4, "little"))
        at = 12
        while at + 8 <= len(data):
            fields.append((at + 4, 4, "little"))
            at += 8 + (int.from_bytes(data[at + 4:at + 8], "little") + 1) // 2 * 2
    else:
        order = "big" if data[:2] == b"MM" else "little"
        fields = [(at, width, order) for width in (2, 4) for at in range(0, min(len(data), 64) - width, width)]
    return fields


def mutate_image(rng: random.Random, name: str, data: bytes) -> tuple[bytes, str]:
    out = bytearray(data)
    kind = rng.choice(["length", "length", "flip-head", "flip", "truncate", "splice"])
    if kind == "length":
        at, width, order = rng.choice(length_fields(name, data))
        value = rng.choice([0, 1, 2, 0x7F, 0xFF, 0x100, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF,
                            int.from_bytes(data[at:at + width], order) + rng.choice([-1, 1, 1000])])
        value &= (1 << (8 * width)) - 1
        out[at:at + width] = value.to_bytes(width, order)
        return bytes(out), f"{width}-byte field at {at} = {value:#x}"
    if kind in ("flip-head", "flip"):
        return flip_bytes(rng, data, min(len(data), 96) if kind == "flip-head" else len(data), 8, kind)
    if kind == "truncate":
        return truncate(rng, data)
    return splice(rng, data)


# Reads the files named on stdin, one per line, until the budget (argv[1], seconds) is spent.
# "BEGIN i" before each read names the case a crash happened in; "BAD i" reports an exception
# that is not a VitqError. Python warnings (PIL's "Corrupt EXIF data", ...) are allowed.
IMAGE_WORKER = r"""
import sys, time
from pathlib import Path
from vitq_edge.data.datasets import read_image
from vitq_edge.errors import VitqError

deadline = time.monotonic() + float(sys.argv[1])
done = 0
for i, line in enumerate(sys.stdin):
    if time.monotonic() > deadline:
        break
    print("BEGIN", i, flush=True)
    try:
        read_image(Path(line.rstrip("\n")), max_pixels=1_000_000)
    except VitqError:
        pass
    except Exception as exc:
        print("BAD", i, f"{type(exc).__module__}.{type(exc).__qualname__}: {str(exc)[:200]!r}", flush=True)
    done += 1
print("DONE", done, flush=True)
"""


def test_read_image_survives_corrupt_images(tmp_path):
    seeds = valid_images()
    names = sorted(seeds)
    cases = []  # (path, mutation)
    for seed in range(IMAGE_CASES):
        name = names[seed % len(names)]
        data, mutation = mutate_image(random.Random(seed), name, seeds[name])
        path = tmp_path / f"case{seed}-{name}"
        path.write_bytes(data)
        cases.append((path, f"{name}: {mutation}"))
    # The max_pixels limit keeps every case small: a corrupt header may claim any size.
    proc = subprocess.run([sys.executable, "-c", IMAGE_WORKER, str(IMAGE_BUDGET_S)],
                          input="".join(f"{path}\n" for path, _ in cases), capture_output=True, text=True,
                          errors="replace", cwd=REPO, timeout=IMAGE_BUDGET_S + 120)
    lines = proc.stdout.splitlines()
    begun = [int(line.split()[1]) for line in lines if line.startswith("BEGIN ")]
    if proc.returncode != 0 or not lines or not lines[-1].startswith("DONE"):
        died = (f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
                else f"exit code {proc.returncode}")
        last = begun[-1] if begun else None
        where = f"case {last} ({cases[last][1]}), file {cases[last][0]}" if last is not None else "before any case"
        pytest.fail(f"the reader's interpreter {died} in {where}; stderr: {proc.stderr[-2000:]}")
    bad = [line.split(" ", 2) for line in lines if line.startswith("BAD ")]
    assert not bad, (f"{len(bad)} of {len(begun)} corrupt images raised something else than VitqError:\n"
                     + "\n".join(f"case {i} ({cases[int(i)][1]}), file {cases[int(i)][0]}: {what}"
                                 for _, i, what in bad[:10]))
    assert int(lines[-1].split()[1]) >= MIN_CASES, f"only {lines[-1].split()[1]} image cases ran in the budget"
