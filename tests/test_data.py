"""Data loading: IDX files, preprocessing as timm defines it, ImageFolder, bundled sets."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
from PIL import Image
from vitq_edge.data.datasets import bundled_set, image_folder
from vitq_edge.data.fashion_mnist import load_split
from vitq_edge.data.preprocess import Preprocess
from vitq_edge.errors import VitqError

from .conftest import make_image_folder


def _write_idx(path, array: np.ndarray, compress: bool) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_reader_round_trips(tmp_path, compress):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 7, dtype=np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", images, compress)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels, compress)
    got_x, got_y = load_split("test", tmp_path)
    np.testing.assert_array_equal(got_x, images)
    np.testing.assert_array_equal(got_y, labels)


def test_idx_reader_names_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_split("train", tmp_path)


def test_preprocess_resize_crop_normalize_like_timm():
    pre = Preprocess(channels=3, size=(224, 224), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                     interpolation="bicubic", crop_pct=0.875)
    assert pre.resize_to == 256  # floor(224 / 0.875)
    # A 512x256 (w x h) image: shorter side -> 256, so width -> 512, then a centered 224 crop.
    img = np.zeros((256, 512, 3), dtype=np.uint8)
    img[:, 256:] = 255  # right half white: the center crop straddles the edge
    x = pre(Image.fromarray(img))
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    assert x[0, 0, 0] == pytest.approx((0 - 0.5) / 0.25)
    assert x[0, 0, -1] == pytest.approx((1 - 0.5) / 0.25)


def test_grayscale_and_rgb_inputs_both_fit_the_model():
    gray_model = Preprocess(channels=1, size=(28, 28), mean=(0.5,), std=(0.5,), crop_pct=1.0)
    rgb_model = Preprocess(channels=3, size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0)
    rgb = Image.fromarray(np.full((40, 40, 3), 200, np.uint8))
    gray = Image.fromarray(np.full((28, 28), 100, np.uint8))
    assert gray_model(rgb).shape == (1, 28, 28)
    assert rgb_model(gray).shape == (3, 32, 32)
    # Identity geometry: values pass through unchanged apart from normalization.
    assert gray_model(gray)[0, 5, 5] == pytest.approx((100 / 255 - 0.5) / 0.5)


def test_manifest_round_trip():
    pre = Preprocess(channels=3, size=(224, 224), mean=(0.1, 0.2, 0.3), std=(1, 2, 3), interpolation="bilinear",
                     crop_pct=0.9)
    assert Preprocess.from_manifest(pre.to_manifest()) == pre


def test_image_folder_classes_and_labels(tmp_path):
    make_image_folder(tmp_path, classes=3, per_class=2, mode="RGB", suffix=".jpg")
    data = image_folder(tmp_path)
    assert data.class_names == ["class_000", "class_001", "class_002"]
    assert data.labels.tolist() == [0, 0, 1, 1, 2, 2]
    pre = Preprocess(channels=1, size=(28, 28), mean=(0.0,), std=(1.0,))
    (x, y), = list(data.batches(pre, batch_size=8))
    assert tuple(x.shape) == (6, 1, 28, 28) and y.tolist() == [0, 0, 1, 1, 2, 2]
    assert len(data.limit(4)) == 4


def test_image_folder_errors(tmp_path):
    with pytest.raises(VitqError, match="does not exist"):
        image_folder(tmp_path / "missing")
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(VitqError, match="holds no images"):
        image_folder(tmp_path / "empty")
    bad = tmp_path / "bad" / "cat"
    bad.mkdir(parents=True)
    (bad / "not_an_image.png").write_text("hello")
    data = image_folder(tmp_path / "bad")
    with pytest.raises(VitqError, match="not_an_image.png"):
        data.source(0)


def test_bundled_sets_are_fashion_mnist_splits():
    calib, evaluation = bundled_set("calib"), bundled_set("eval")
    assert len(calib) == 1024 and len(evaluation) == 10_000
    assert len(evaluation.class_names) == 10
    # Every class is present in both, so the subsets are not degenerate.
    assert set(calib.labels.tolist()) == set(range(10)) == set(evaluation.labels.tolist())
    assert calib.source(0).size == (28, 28)
