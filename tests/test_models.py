"""Model sources: bundled reference, timm names, checkpoints, kwargs, and their errors."""

from __future__ import annotations

import pytest
import torch
from vitq_edge.build_options import parse_model_kwargs
from vitq_edge.errors import VitqError
from vitq_edge.models.reference import REFERENCE_CONFIG, load_reference_meta
from vitq_edge.models.source import load_model


def test_reference_model_matches_its_recorded_config():
    loaded = load_model()
    meta = load_reference_meta()
    assert meta["config"] == REFERENCE_CONFIG
    cfg = REFERENCE_CONFIG
    # A real ViT shape: >= 6 blocks, width >= 192 with 64-wide heads, class token.
    assert cfg["depth"] >= 6 and cfg["embed_dim"] >= 192 and cfg["embed_dim"] // cfg["num_heads"] == 64
    assert loaded.model.cls_token is not None
    assert loaded.labels == meta["labels"] and len(loaded.labels) == 10
    assert loaded.preprocess.channels == 1 and loaded.preprocess.size == (28, 28)
    out = loaded.model(torch.zeros(2, 1, 28, 28))
    assert tuple(out.shape) == (2, 10)


def test_model_kwargs_parsing():
    assert parse_model_kwargs("img_size=32,patch_size=4,in_chans=3,global_pool=avg") == {
        "img_size": 32, "patch_size": 4, "in_chans": 3, "global_pool": "avg"}
    assert parse_model_kwargs(None) == {}
    with pytest.raises(VitqError, match="key=value"):
        parse_model_kwargs("img_size")


def test_timm_model_with_kwargs_and_checkpoint(tmp_path):
    kwargs = dict(img_size=32, patch_size=4, in_chans=3, num_classes=100, depth=2)
    loaded = load_model("deit_tiny_patch16_224", model_kwargs=kwargs)
    assert loaded.num_classes == 100 and loaded.preprocess.size == (32, 32)
    assert loaded.notes  # random weights are flagged
    ckpt = tmp_path / "w.pt"
    torch.save(loaded.model.state_dict(), ckpt)
    again = load_model("deit_tiny_patch16_224", model_kwargs=kwargs, checkpoint=ckpt)
    for (k, a), b in zip(loaded.model.state_dict().items(), again.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert again.checkpoint_sha256 and not again.notes


def test_model_errors(tmp_path):
    with pytest.raises(VitqError, match="unknown model"):
        load_model("not_a_model_name")
    with pytest.raises(VitqError, match="not a ViT"):
        load_model("resnet18")
    with pytest.raises(VitqError, match="does not exist"):
        load_model(checkpoint=tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02 definitely not a checkpoint")
    with pytest.raises(VitqError, match="not a readable torch file"):
        load_model(checkpoint=corrupt)
    other = tmp_path / "other.pt"
    torch.save(load_model("deit_tiny_patch16_224", model_kwargs=dict(img_size=32, depth=1)).model.state_dict(),
               other)
    with pytest.raises(VitqError, match="does not fit the model"):
        load_model(checkpoint=other)


def test_pretrained_without_network_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    # Fail at once instead of retrying a dead network. huggingface_hub read the variable when
    # it was imported (by an earlier test), so set its constant too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(VitqError, match="--checkpoint"):
        load_model("deit_tiny_patch16_224", pretrained=True)
