"""Shared fixtures: the CLI as a user runs it (a subprocess) or in this process, small image folders."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# No per-example deadline: on a loaded 2-core machine (a build running beside the tests, a shared CI
# runner) a 200 ms deadline fails correct examples; each property still runs its examples.
settings.register_profile("vitq", deadline=None)
settings.load_profile("vitq")


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


def run_cli(*args: str, env: dict | None = None, timeout: int = 900) -> CliResult:
    """Run `vitq-edge ARGS` in a fresh interpreter, exactly as from a shell."""
    full_env = {**os.environ, **(env or {})}
    script = Path(sys.executable).parent / "vitq-edge"  # the console script pip installed
    proc = subprocess.run([str(script), *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=REPO)
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def invoke_cli(*args: str) -> CliResult:
    """`vitq-edge ARGS` in this process (click's CliRunner): for usage errors and other cases that need
    no fresh interpreter (signals, native stderr and child processes do: `run_cli`)."""
    from click.testing import CliRunner
    from vitq_edge.cli import main

    result = CliRunner().invoke(main, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback is a failure in itself
    return CliResult(result.exit_code, result.stdout, result.stderr)


def assert_user_error(result: CliResult, *fragments: str) -> None:
    """Exit code 2, one `error:` line naming the problem, and no Python traceback."""
    assert result.code == 2, (result.code, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]


@pytest.fixture(scope="session")
def cli():
    return run_cli


EVAL_LIMIT = 300


@pytest.fixture(scope="session")
def int8_build(tmp_path_factory) -> Path:
    """The README's main job (stock int8 for rpi4 on the bundled model), built once per session."""
    out = tmp_path_factory.mktemp("builds") / "rpi4"
    result = run_cli("build", "--target", "rpi4", "--out", str(out), "--calib-limit", "256",
                     "--eval-limit", str(EVAL_LIMIT), "--quiet")
    assert result.code == 0, result.stderr[-3000:]
    assert "wrote" in result.stdout
    return out


def make_image_folder(root: Path, classes: int, per_class: int, mode: str = "L", size: int = 28,
                      suffix: str = ".png", seed: int = 0) -> Path:
    """A small ImageFolder of random images (class_000/..., class_001/...)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class_{c:03d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = (size, size) if mode == "L" else (size, size, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(d / f"img_{i}{suffix}")
    return root
