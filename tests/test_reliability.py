"""Every mistaken or hostile input gets one `error:` line and exit 2; nothing is lost or left behind.

The table of cases (tests/reliability_cases.py) runs in-process through click's CliRunner;
what needs a real process (signals, native stderr, child processes) runs the console script.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from vitq_edge.cli import main

from .conftest import REPO, assert_user_error, run_cli
from .reliability_cases import CASES, FASHION_LABELS, Case, image_folder


def visible_lines(stream: str) -> list[str]:
    """What a terminal shows of `stream`: each line's text after its last carriage return."""
    return [line.rsplit("\r", 1)[-1] for line in stream.splitlines() if line.rsplit("\r", 1)[-1].strip()]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_case(case: Case, int8_build: Path, tmp_path: Path) -> None:
    args = case.make(tmp_path, int8_build)
    result = CliRunner().invoke(main, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback is a failure in itself
    shown = visible_lines(result.stderr)
    if case.code == 2:
        assert result.exit_code == 2, (result.exit_code, result.stderr[-2000:])
        assert len(shown) == 1 and shown[0].startswith("error: "), shown
        line = shown[0]
        assert not result.stdout, result.stdout
    else:
        assert result.exit_code == case.code, (result.exit_code, result.stderr[-2000:])
        assert not shown, shown
        line = result.stdout
    for fragment in case.fragments:
        assert fragment in line, line
    for fragment in case.absent:
        assert fragment not in result.stderr and fragment not in line, result.stderr
    if case.check is not None:
        case.check(tmp_path)
    if case.code == 2:  # a refused command leaves nothing: no output folder, no stage folder
        assert not (tmp_path / "o").exists()
        assert not [p.name for p in tmp_path.rglob(".*.tmp-*")]


# ---- what a case table cannot show: labels, images, crop, ssh argv, native stderr ----


def test_folders_named_after_labels_score_as_their_labels(int8_build, tmp_path):
    """The same images in c0..c9 (label order) and in folders named after the labels, shuffled order."""
    from vitq_edge.data.datasets import bundled_set

    images = bundled_set("eval").limit(60)
    order = [FASHION_LABELS[i].replace("/", "_") for i in range(10)]
    for folder_names, root in ((None, tmp_path / "indexed"), (order, tmp_path / "named")):
        for i, (image, label) in enumerate(zip(images._arrays, images.labels, strict=True)):
            name = folder_names[label] if folder_names else f"c{label}"
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / name / f"{i:03d}.png")
    runner = CliRunner()
    scores = {}
    for root in (tmp_path / "indexed", tmp_path / "named"):
        result = runner.invoke(main, ["eval", str(int8_build), "--data", str(root), "--json", "--quiet"])
        assert result.exit_code == 0, result.stderr
        scores[root.name] = json.loads(result.stdout)
    assert scores["named"]["class_mapping"] == "folder names = the model's labels"
    assert scores["indexed"]["class_mapping"] == "sorted folder names"
    # Sorted, the label-named folders would put "Ankle boot" first: the scores would differ.
    assert sorted(order) != order
    assert scores["named"]["top1"] == scores["indexed"]["top1"] > 70.0


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    from vitq_edge.data.datasets import read_image
    from vitq_edge.data.preprocess import Preprocess

    wide = (np.arange(28 * 28, dtype=np.uint32).reshape(28, 28) * 83).astype(np.uint16)  # up to 65,000
    Image.fromarray(wide).save(tmp_path / "g16.png")
    image = read_image(tmp_path / "g16.png")
    assert image.mode == "I;16"
    x = Preprocess(channels=1, size=(28, 28), mean=(0.0,), std=(1.0,))(image)
    expected = np.round(wide / 257.0) / 255.0
    np.testing.assert_allclose(x[0], expected, atol=1e-6)
    assert abs(float(x.mean()) - float(wide.mean()) / 65535) < 0.002


def test_hidden_files_and_apple_double_are_skipped(tmp_path):
    from vitq_edge.data.datasets import image_folder as read_folder

    root = image_folder(tmp_path / "d", ["a", "b"], per_class=2)
    (root / "a" / "._img0.png").write_bytes(b"\0\5\26\7 resource fork")
    (root / "b" / ".hidden").mkdir()
    Image.new("L", (8, 8)).save(root / "b" / ".hidden" / "x.png")
    images = read_folder(root)
    assert len(images) == 4 and all(not p.name.startswith(".") for p in images._paths)


@pytest.mark.slow
def test_crop_pct_and_interpolation_are_applied_and_recorded(tmp_path):
    out = tmp_path / "o"
    result = run_cli("build", "--recipe", "fp32", "--crop-pct", "1", "--interpolation", "bilinear",
                     "--calib-limit", "16", "--eval-limit", "50", "--out", str(out), "--quiet")
    assert result.code == 0, result.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["input"]["crop_pct"] == 1.0 and manifest["input"]["interpolation"] == "bilinear"
    assert manifest["input"]["resize_shorter_side"] == 28
    assert manifest["format"] == "vitq-edge-build/1"


def test_ssh_gets_the_destination_after_double_dash(int8_build, tmp_path):
    """Every ssh/scp call ends its options with `--`: a fake ssh on PATH records its argv."""
    fake = tmp_path / "bin"
    fake.mkdir()
    log = tmp_path / "argv.txt"
    for tool in ("ssh", "scp"):
        (fake / tool).write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" >> {log}\n'
                                 'echo "ssh: connect: Connection refused" >&2\nexit 255\n')
        (fake / tool).chmod(0o755)
    env = {"PATH": f"{fake}:{os.environ['PATH']}"}
    result = CliRunner().invoke(main, ["bench", str(int8_build), "--device", "ssh://pi@raspberrypi.local"], env=env)
    assert result.exit_code == 2, result.stderr
    words = log.read_text().splitlines()
    assert "pi@raspberrypi.local" in words
    assert words[words.index("pi@raspberrypi.local") - 1] == "--"


def test_native_chatter_stays_off_stderr(int8_build, tmp_path):
    """A real process (ExecuTorch writes to fd 2 itself): stderr is the error line and nothing else."""
    broken = tmp_path / "b"
    shutil.copytree(int8_build, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["input"]["size"] = [32, 32]
    (broken / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("eval", str(broken), "--limit", "2")
    assert_user_error(result, "failed when run")
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    ok = run_cli("eval", str(int8_build), "--limit", "2", "--quiet")
    assert ok.code == 0 and ok.stderr == "", ok.stderr


# ---- interruptions: nothing left behind ----


def _stray(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def _start(*args: str) -> subprocess.Popen:
    script = Path(sys.executable).parent / "vitq-edge"
    return subprocess.Popen([str(script), *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_build_leaves_no_stage_folder(tmp_path, sig):
    out = tmp_path / "out"
    proc = _start("build", "--out", str(out), "--eval-limit", "2000", "--quiet")
    _wait_for(lambda: _stray(tmp_path, "out"), 120, "the build's stage folder")
    time.sleep(2)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == (128 + sig if sig == signal.SIGTERM else -sig), stderr
    if sig == signal.SIGTERM:
        assert stderr.strip() == "error: stopped by SIGTERM"
        assert not _stray(tmp_path, "out")
    else:
        assert _stray(tmp_path, "out")  # nothing can clean up after SIGKILL itself ...
        # ... the next build into the same place does (here one that fails fast, after the sweep).
        result = run_cli("build", "--out", str(out), "--calib", str(image_folder(tmp_path / "few", ["a"])),
                         "--skip-eval", "--calib-limit", "1", "--recipe", "fp32", "--quiet")
        assert result.code == 0, result.stderr
        assert not _stray(tmp_path, "out")
    assert not out.exists() or sig == signal.SIGKILL


def _qemu_children() -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "qemu-aarch64" in cmdline and "State:\tZ" not in status and "vitq-runner" in cmdline:
            found.append(f"{entry.name}: {cmdline[:120]}")
    return found


def _temp_leftovers(before: set[str]) -> set[str]:
    names = {p.name for p in Path(tempfile.gettempdir()).iterdir() if p.name.startswith(("vitq-eval-", "vitq-run-"))}
    return names - before


@pytest.mark.slow
@pytest.mark.device
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_emulated_eval_leaves_no_process_or_temp_folder(int8_build, sig):
    if shutil.which("qemu-aarch64") is None:
        pytest.skip("qemu-user not installed (bash tools/setup.sh)")
    before = _temp_leftovers(set())
    assert not _qemu_children(), "an emulator from elsewhere is running"
    proc = _start("eval", str(int8_build), "--device", "emulated-rpi4", "--limit", "300", "--quiet")
    _wait_for(lambda: bool(_qemu_children()), 120, "the emulator to start")
    time.sleep(1)
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    _wait_for(lambda: not _qemu_children(), 10, "the emulator to end")
    if sig == signal.SIGKILL:
        assert _temp_leftovers(before)  # the killed process could not clean up ...
        assert run_cli("targets").code == 0  # ... the next command does
    assert not _temp_leftovers(before)


# SIGTERM raised inside a finalizer, where Python prints an exception and drops it (as
# happened in CI inside one of torch's weakref callbacks, and the build then finished).
_SIGTERM_IN_A_FINALIZER = """
import signal, time
from vitq_edge.lifetime import Terminated, handle_termination
handle_termination()
class SignalsWhenCollected:
    def __del__(self):
        signal.raise_signal(signal.SIGTERM)  # the handler runs here, inside __del__
try:
    SignalsWhenCollected()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        time.sleep(0.01)
    print("ran on")
except Terminated as exc:
    print("stopped by", exc)
"""


def test_sigterm_dropped_by_a_finalizer_still_stops_the_command():
    done = subprocess.run([sys.executable, "-c", _SIGTERM_IN_A_FINALIZER], capture_output=True, text=True,
                          timeout=60)
    assert done.stdout.strip() == "stopped by SIGTERM", done.stdout + done.stderr
    assert done.stderr == ""  # Python's "Exception ignored in ..." is not printed either


def test_a_sweep_never_takes_what_is_not_ours_or_in_use(tmp_path):
    from vitq_edge.lifetime import MARKER, OwnedDir, sweep

    foreign = tmp_path / "vitq-run-foreign"  # our prefix, but no marker: not ours
    foreign.mkdir()
    (foreign / "data").write_text("keep")
    live = OwnedDir("vitq-run-", tmp_path)  # ours, but its owner (we) is alive
    dead = tmp_path / "vitq-run-dead"  # ours, owner gone
    dead.mkdir()
    (dead / MARKER).touch()
    assert sweep(tmp_path, "vitq-run-") == [dead]
    assert foreign.exists() and live.path.exists() and not dead.exists()
    live.release()
    assert not live.path.exists()


def test_stage_folder_is_not_world_writable_marker_free_on_success(tmp_path):
    """A finished build folder holds exactly what a build writes (no ownership marker leaks into it)."""
    from vitq_edge.artifacts import staged_dir

    out = tmp_path / "o"
    with staged_dir(out) as stage:
        (stage / "model.pte").write_bytes(b"x")
        (stage / "manifest.json").write_text('{"format": "vitq-edge-build/1"}')
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.pte"]
    assert not out.stat().st_mode & stat.S_IWOTH
    assert not _stray(tmp_path, "o")


def test_a_tools_measurement_is_written_whole_or_not_at_all(tmp_path):
    from vitq_edge.artifacts import write_measurement

    stem = tmp_path / "docs" / "validation" / "probe"
    write_measurement(stem, {"rows": [1]}, ["# old"])
    write_measurement(stem, {"rows": [1, 2]}, ["# title", "", "| a |"])
    assert json.loads(stem.with_suffix(".json").read_text()) == {"rows": [1, 2]}
    assert stem.with_suffix(".md").read_text() == "# title\n\n| a |\n"
    with pytest.raises(TypeError):  # a result JSON cannot hold: neither file is touched
        write_measurement(stem, {"rows": {1, 2}}, ["# new"])
    assert stem.with_suffix(".md").read_text() == "# title\n\n| a |\n"
    assert sorted(p.name for p in stem.parent.iterdir()) == ["probe.json", "probe.md"]  # no temporary files
