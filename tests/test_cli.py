"""The CLI end to end: real builds, real .pte programs, and every bad input a user can give."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from vitq_edge.hostinfo import cpu_model, host_description, torch_description

from .conftest import EVAL_LIMIT, assert_user_error, invoke_cli, make_image_folder, run_cli


def _no_stray_files(parent: Path, name: str) -> None:
    stray = [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]
    assert not stray, stray


def test_targets_lists_cpus_and_abis():
    result = invoke_cli("targets", "--json")
    assert result.code == 0
    targets = {t["name"]: t for t in json.loads(result.stdout)}
    assert set(targets) == {"host", "rpi4", "rpi5", "android-arm64"}
    assert targets["rpi4"]["cpu"] == "Cortex-A72" and targets["rpi4"]["abi"] == "aarch64-linux-gnu"
    assert targets["rpi5"]["cpu"] == "Cortex-A76"


def test_build_help_explains_defaults():
    result = invoke_cli("build", "--help")
    assert result.code == 0
    for flag in ("--target", "--recipe", "--model", "--pretrained", "--checkpoint", "--model-kwargs",
                 "--calib", "--eval", "--mean", "--std", "--input-size", "--out", "--quiet"):
        assert flag in result.stdout
    assert "default: rpi4" in result.stdout


def test_default_build_writes_program_manifest_and_report(int8_build):
    pte = int8_build / "model.pte"
    manifest = json.loads((int8_build / "manifest.json").read_text())
    assert manifest["recipe"] == "xnnpack-int8" and manifest["bits"] == "W8A8"
    assert manifest["target"]["name"] == "rpi4" and manifest["target"]["cpu"] == "Cortex-A72"
    assert manifest["model"]["name"] == "vitq_reference_fmnist" and len(manifest["model"]["checkpoint_sha256"]) == 64
    assert manifest["model"]["config"]["depth"] == 6
    assert manifest["input"]["shape"] == [1, 1, 28, 28] and manifest["input"]["dtype"] == "float32"
    assert len(manifest["input"]["mean"]) == 1 and len(manifest["labels"]) == 10
    assert manifest["size_bytes"] == pte.stat().st_size
    assert manifest["custom_ops"] == [] and manifest["executorch_version"].startswith("1.5.1")
    assert manifest["command"].startswith("vitq-edge build --target rpi4")
    # Where it was built, CPU model and torch's kernel dispatch included (they set calibration's rounding).
    assert manifest["host"] == host_description() and cpu_model() in manifest["host"]
    assert manifest["torch"] == torch_description() and manifest["torch"].endswith(")")
    acc = manifest["accuracy"]
    assert acc["eval_images"] == EVAL_LIMIT
    assert acc["fp32"] > 80.0  # the bundled model is trained
    assert abs(acc["pte_host"] - acc["fp32"]) <= 2.0
    report = (int8_build / "report.md").read_text()
    assert "xnnpack-int8" in report and f"{acc['pte_host']}" in report
    _no_stray_files(int8_build.parent, "rpi4")


@pytest.mark.slow
def test_eval_reproduces_the_manifest_accuracy(int8_build):
    manifest = json.loads((int8_build / "manifest.json").read_text())
    result = run_cli("eval", str(int8_build), "--limit", str(EVAL_LIMIT), "--json", "--quiet")
    assert result.code == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["n"] == EVAL_LIMIT
    assert report["top1"] == manifest["accuracy"]["pte_host"]
    assert report["top5"] >= report["top1"]
    # A .pte path works as well as the folder.
    text = run_cli("eval", str(int8_build / "model.pte"), "--limit", "50", "--quiet")
    assert text.code == 0 and "top-1" in text.stdout and "on 50 images" in text.stdout


def test_eval_on_user_image_folder(int8_build, tmp_path):
    make_image_folder(tmp_path / "imgs", classes=10, per_class=2, mode="RGB", size=40, suffix=".jpg")
    result = run_cli("eval", str(int8_build), "--data", str(tmp_path / "imgs"), "--json", "--quiet")
    assert result.code == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["n"] == 20


def test_pte_runs_in_plain_executorch_runtime(int8_build):
    """An app needs only ExecuTorch: no vitq_edge code involved in running the program."""
    code = textwrap.dedent(f"""
        import sys, json
        import numpy as np, torch
        from executorch.runtime import Runtime
        manifest = json.load(open({str(int8_build / 'manifest.json')!r}))
        with np.load({str(Path(__file__).parents[1] / 'sdk/vitq_edge/assets/reference/eval.npz')!r}) as z:
            images, labels = z["images"][:100], z["labels"][:100]
        mean, std = manifest["input"]["mean"][0], manifest["input"]["std"][0]
        method = Runtime.get().load_program({str(int8_build / 'model.pte')!r}).load_method("forward")
        correct = 0
        for img, label in zip(images, labels):
            x = torch.from_numpy(((img / 255.0 - mean) / std).astype(np.float32)).reshape(1, 1, 28, 28)
            out = method.execute([x])[0]
            assert tuple(out.shape) == (1, 10)
            correct += int(out.argmax()) == int(label)
        assert not any(m.startswith("vitq_edge") for m in sys.modules)
        print(correct)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.strip().splitlines()[-1]) >= 80  # a trained model, so most of 100 are right


@pytest.mark.slow
def test_fp32_recipe_simulation_is_the_float_model(tmp_path):
    out = tmp_path / "fp32"
    result = run_cli("build", "--recipe", "fp32", "--target", "host", "--out", str(out), "--eval-limit", "100",
                     "--quiet")
    assert result.code == 0, result.stderr[-3000:]
    acc = json.loads((out / "manifest.json").read_text())["accuracy"]
    assert acc["simulated"] == acc["fp32"]
    assert acc["pte_agrees_with_simulated"] >= 99.0


@pytest.mark.slow
def test_timm_model_on_rgb_image_folders(tmp_path):
    make_image_folder(tmp_path / "calib", classes=3, per_class=4, mode="RGB", size=48, suffix=".jpg")
    make_image_folder(tmp_path / "eval", classes=3, per_class=3, mode="L", size=40, suffix=".png", seed=1)
    out = tmp_path / "tiny"
    result = run_cli("build", "--model", "deit_tiny_patch16_224", "--model-kwargs",
                     "img_size=32,patch_size=8,num_classes=3,depth=2", "--calib", str(tmp_path / "calib"),
                     "--eval", str(tmp_path / "eval"), "--target", "rpi5", "--out", str(out),
                     "--mean", "0.5", "--std", "0.25", "--quiet")
    assert result.code == 0, result.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["input"]["shape"] == [1, 3, 32, 32]
    assert manifest["input"]["mean"] == [0.5, 0.5, 0.5] and manifest["input"]["std"] == [0.25, 0.25, 0.25]
    assert manifest["labels"] == ["class_000", "class_001", "class_002"]
    assert manifest["accuracy"]["eval_images"] == 9 and manifest["calibration"]["images"] == 12
    assert manifest["model"]["notes"] == ["random weights (no --pretrained or --checkpoint)"]


# ---- bad input: one line, exit code 2, no traceback, nothing left behind ----
# (most cases live in tests/reliability_cases.py, run by tests/test_reliability.py)


def test_pretrained_without_network(tmp_path):
    # A fresh process: huggingface_hub reads HF_HUB_OFFLINE when imported (tests/test_models.py
    # checks the same in-process).
    result = run_cli("build", "--model", "deit_tiny_patch16_224", "--pretrained", "--out", str(tmp_path / "o"),
                     env={"HF_HUB_OFFLINE": "1"})
    assert_user_error(result, "pretrained weights", "--checkpoint FILE")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every folder")
def test_unreadable_data_folder(tmp_path):
    locked = make_image_folder(tmp_path / "locked", classes=2, per_class=1)
    locked.chmod(0)
    try:
        assert_user_error(invoke_cli("build", "--calib", str(locked), "--out", str(tmp_path / "o")), "not readable")
    finally:
        locked.chmod(0o755)


def test_image_that_is_not_an_image_leaves_previous_build_untouched(tmp_path):
    calib = make_image_folder(tmp_path / "calib", classes=2, per_class=2)
    (calib / "class_001" / "broken.jpg").write_bytes(b"this is text, not a JPEG")
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.pte").write_bytes(b"previous build")
    (out / "manifest.json").write_text('{"format": "vitq-edge-build/1"}')
    result = run_cli("build", "--calib", str(calib), "--out", str(out))
    assert_user_error(result, "broken.jpg")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.pte"]
    assert (out / "model.pte").read_bytes() == b"previous build"
    _no_stray_files(tmp_path, "out")


@pytest.mark.parametrize("args,fragment", [
    (["--recipe", "minmax", "--option", "candidates=3"], "recipe minmax has no option 'candidates'; it has"),
    (["--recipe", "liu2021", "--option", "rounds=two"], "rounds='two': expected int"),
    (["--recipe", "adfq", "--option", "=1"], "bad --option '=1'"),
])
def test_build_recipe_option_errors(args, fragment, tmp_path):
    from click.testing import CliRunner
    from vitq_edge.cli import main

    result = CliRunner().invoke(main, ["build", *args, "--out", str(tmp_path / "o")])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and fragment in lines[0], result.stderr
    assert not (tmp_path / "o").exists()
