"""Mistaken and hostile inputs, each with what the user must see: one source for the tests and the table.

`tests/test_reliability.py` runs every case in-process (click's CliRunner) and checks the
exit code, the single `error:` line and the case's own post-condition (files kept, nothing
created); `tools/reliability_table.py` runs each as a real command and writes
docs/reliability.md. A case gets a scratch folder and a finished build of the bundled model
(`BUILD`), and returns the command's arguments.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
REFERENCE_WEIGHTS = REPO / "sdk" / "vitq_edge" / "assets" / "reference" / "weights.pt"
FASHION_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@dataclass(frozen=True)
class Case:
    id: str
    item: str  # where it comes from: the reliability issue's numbered case, or "suite"
    what: str
    make: Callable[[Path, Path], list[str]]  # (scratch folder, a finished build) -> arguments
    code: int = 2
    fragments: tuple[str, ...] = ()  # must appear in the error line (code 2) or stdout (code 0)
    absent: tuple[str, ...] = ()  # must not appear in the error line / stderr
    check: Callable[[Path], None] | None = None  # post-condition on the scratch folder


# ---- helpers that make inputs ------------------------------------------------------------


def png_bytes(width: int, height: int, idat: bytes, extra: bytes = b"", bit_depth: int = 8,
              color_type: int = 0) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + extra + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


def bomb_png() -> bytes:
    """A 50,000 x 50,000 grayscale PNG in a few KB: decoding it would take 2.5 GB."""
    return png_bytes(50_000, 50_000, zlib.compress(b"\0" * (50_001 * 64), 9))


def text_bomb_png() -> bytes:
    """A 28 x 28 PNG whose compressed text chunk inflates to 64 MB."""
    ztxt = b"Comment\0\0" + zlib.compress(b"A" * (64 << 20), 9)
    chunk = struct.pack(">I", len(ztxt)) + b"zTXt" + ztxt + struct.pack(">I", zlib.crc32(b"zTXt" + ztxt) & 0xFFFFFFFF)
    return png_bytes(28, 28, zlib.compress(b"".join(b"\0" + b"\x80" * 28 for _ in range(28))), extra=chunk)


def image_folder(root: Path, names: list[str] | None = None, per_class: int = 1, size: int = 28,
                 seed: int = 0) -> Path:
    """Class folders (default c0..c9) of small random grayscale PNGs."""
    rng = np.random.default_rng(seed)
    for name in names or [f"c{i}" for i in range(10)]:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(folder / f"img{i}.png")
    return root


def copy_build(build: Path, to: Path) -> Path:
    shutil.copytree(build, to)
    return to


def edit_manifest(folder: Path, edit: Callable[[dict], None]) -> Path:
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def damaged_manifest(edit: Callable[[dict], None]) -> Callable[[Path, Path], list[str]]:
    def make(tmp: Path, build: Path) -> list[str]:
        return ["eval", str(edit_manifest(copy_build(build, tmp / "b"), edit)), "--limit", "5"]
    return make


def state_dict_file(path: Path, poison: Callable[[dict], None] | None = None) -> Path:
    import torch

    state = torch.load(REFERENCE_WEIGHTS, weights_only=True)
    if poison is not None:
        poison(state)
    torch.save(state, path)
    return path


def _nan(state: dict) -> None:
    state["blocks.2.mlp.fc1.weight"][3, 5] = float("nan")


def pickled_model(path: Path) -> Path:
    import torch

    torch.save({"model": torch.nn.Linear(2, 2)}, path)  # a module object, not tensors
    return path


# ---- post-conditions ---------------------------------------------------------------------


def kept(*names: str) -> Callable[[Path], None]:
    def check(tmp: Path) -> None:
        for name in names:
            assert (tmp / name).exists(), f"{name} was deleted"
    return check


def not_created(name: str) -> Callable[[Path], None]:
    def check(tmp: Path) -> None:
        for where in (tmp / name, Path.cwd() / f"{tmp.name}{name}"):
            assert not where.exists(), f"{where} was created"
    return check


# ---- the cases ---------------------------------------------------------------------------


def _web_project(tmp: Path, build: Path) -> list[str]:
    web = tmp / "web"
    (web / "src").mkdir(parents=True)
    (web / "photos").mkdir()
    (web / "manifest.json").write_text('{"name": "my-site", "start_url": "/"}')
    (web / "index.html").write_text("<html></html>")
    (web / "src" / "app.js").write_text("main()")
    return ["build", "--out", str(web), "--skip-eval"]


def _thesis(tmp: Path, build: Path) -> list[str]:
    (tmp / "mine").mkdir()
    (tmp / "mine" / "thesis.tex").write_text("precious")
    return ["build", "--out", str(tmp / "mine")]


def _build_plus_notes(tmp: Path, build: Path) -> list[str]:
    out = copy_build(build, tmp / "out")
    (out / "notes.txt").write_text("mine")
    return ["build", "--out", str(out)]


def _checkpoint_inside(tmp: Path, build: Path) -> list[str]:
    out = copy_build(build, tmp / "out")
    shutil.copy(REFERENCE_WEIGHTS, out / "w.pt")
    return ["build", "--checkpoint", str(out / "w.pt"), "--out", str(out)]


def _calib_inside(tmp: Path, build: Path) -> list[str]:
    out = copy_build(build, tmp / "out")
    image_folder(out / "calib")
    return ["build", "--calib", str(out / "calib"), "--out", str(out)]


def _ssh(destination: str) -> Callable[[Path, Path], list[str]]:
    def make(tmp: Path, build: Path) -> list[str]:
        # No "/" in the user part (it would end the URL's authority): the file lands beside the scratch folder.
        return ["bench", str(build), "--device", destination.replace("TMP", tmp.name)]
    return make


def _eval_on(folder_maker: Callable[[Path], Path]) -> Callable[[Path, Path], list[str]]:
    def make(tmp: Path, build: Path) -> list[str]:
        return ["eval", str(build), "--data", str(folder_maker(tmp)), "--quiet"]
    return make


def _with_file(name: str, data: Callable[[], bytes]) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        root = image_folder(tmp / "data")
        (root / "c3" / name).write_bytes(data())
        return root
    return make


def _big_image(tmp: Path) -> Path:
    root = image_folder(tmp / "data")
    Image.new("L", (10_000, 10_000), 128).save(root / "c4" / "big.png")  # 100 M pixels, a few hundred KB
    return root


def _non_utf8(tmp: Path) -> Path:
    def name(raw: bytes) -> str:  # how Python spells a file name that is not UTF-8
        return raw.decode("utf-8", "surrogateescape")

    return image_folder(tmp / name(b"data-\xff"), [name(b"c\xfe") + str(i) for i in range(10)])


def _build_non_utf8(tmp: Path, build: Path) -> list[str]:
    data = _non_utf8(tmp)
    return ["build", "--recipe", "fp32", "--calib", str(data), "--eval", str(data), "--out", str(tmp / "o"),
            "--quiet"]


def _labels_as_folders(tmp: Path) -> Path:
    return image_folder(tmp / "named", [x.replace("/", "_") for x in FASHION_LABELS])


def _partial_labels(tmp: Path) -> Path:
    return image_folder(tmp / "partial", [x.replace("/", "_") for x in FASHION_LABELS[:9]] + ["misc"])


def _loop_link(tmp: Path) -> Path:
    root = image_folder(tmp / "loop")
    shutil.rmtree(root / "c9")
    (root / "c9").symlink_to(root)
    return root


def _apple_double(tmp: Path) -> Path:
    root = image_folder(tmp / "mac")
    (root / "c1" / "._img0.png").write_bytes(b"\0\5\26\7AppleDouble resource fork")
    (root / "c1" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return root


def _runs_but_fails(tmp: Path, build: Path) -> list[str]:
    # A valid manifest whose input shape the program was not exported for.
    out = edit_manifest(copy_build(build, tmp / "b"), lambda m: m["input"].update(size=[32, 32]))
    return ["eval", str(out), "--limit", "2"]


def _sparse_60gb(tmp: Path, build: Path) -> list[str]:
    out = copy_build(build, tmp / "b")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    with open(out / "model.pte", "r+b") as f:
        f.truncate(max(60 << 30, memory + (1 << 30)))  # more than this machine's memory, whatever it has
    return ["eval", str(out), "--limit", "2"]


def _truncated_pte(tmp: Path, build: Path) -> list[str]:
    out = copy_build(build, tmp / "b")
    data = (out / "model.pte").read_bytes()
    (out / "model.pte").write_bytes(data[: len(data) // 3])
    return ["eval", str(out), "--limit", "5"]


def _lonely_pte(tmp: Path, build: Path) -> list[str]:
    (tmp / "lonely").mkdir()
    shutil.copy(build / "model.pte", tmp / "lonely" / "model.pte")
    return ["eval", str(tmp / "lonely")]


def _plain(*args: str) -> Callable[[Path, Path], list[str]]:
    def make(tmp: Path, build: Path) -> list[str]:
        return [a.replace("TMP", str(tmp)).replace("BUILD", str(build)) for a in args]
    return make


def _file(tmp: Path, name: str = "a_file", text: str = "x") -> Path:
    (tmp / name).write_text(text)
    return tmp / name


CASES: list[Case] = [
    # 1. data loss: only a build's own folder is ever replaced
    Case("foreign-manifest", "1", "--out is a web project with its own manifest.json", _web_project,
         fragments=("manifest.json that vitq-edge did not write",),
         check=kept("web/index.html", "web/src/app.js", "web/photos", "web/manifest.json")),
    Case("folder-not-a-build", "1", "--out holds a user's files and no build", _thesis,
         fragments=("no vitq-edge build",), check=kept("mine/thesis.tex")),
    Case("build-plus-user-file", "1", "--out is an earlier build plus a file of the user's", _build_plus_notes,
         fragments=("files a build does not write", "notes.txt"), check=kept("out/notes.txt", "out/model.pte")),
    # 2. inputs inside --out
    Case("checkpoint-inside-out", "2", "--checkpoint inside the build folder it would replace",
         _checkpoint_inside, fragments=("--checkpoint", "inside the output folder"), check=kept("out/w.pt")),
    Case("calib-inside-out", "2", "--calib inside the build folder it would replace", _calib_inside,
         fragments=("--calib", "inside the output folder"), check=kept("out/calib/c0/img0.png")),
    # 3. ssh option injection
    Case("ssh-user-injection", "3", "ssh user part that is an ssh option",
         _ssh("ssh://-oProxyCommand=touch${IFS}TMP_pwned@x"), fragments=("user name",),
         check=not_created("_pwned")),
    Case("ssh-host-injection", "3", "ssh host part that is an ssh option", _ssh("ssh://pi@-oProxyCommand=x"),
         fragments=("host",)),
    # 4. images
    Case("decompression-bomb", "4", "a 50,000 x 50,000 PNG bomb of a few KB among the images",
         _eval_on(_with_file("bomb.png", bomb_png)), fragments=("bomb.png", "--max-image-pixels")),
    Case("text-chunk-bomb", "4", "a PNG whose text chunk inflates to 64 MB",
         _eval_on(_with_file("text.png", text_bomb_png)), fragments=("text.png", "cannot read image")),
    Case("big-genuine-image", "4", "a genuine 10,000 x 10,000 image: no PIL warning", _eval_on(_big_image),
         code=0, fragments=("on 11 images",), absent=("DecompressionBomb", "Warning")),
    # 5. numbers
    Case("nan-checkpoint", "5", "a checkpoint with a NaN weight",
         lambda tmp, b: ["build", "--checkpoint", str(state_dict_file(tmp / "nan.pt", _nan)), "--out",
                         str(tmp / "o")],
         fragments=("NaN/Inf", "blocks.2.mlp.fc1.weight")),
    Case("mean-nan", "5", "--mean nan", _plain("build", "--mean", "nan", "--out", "TMP/o"),
         fragments=("--mean", "NaN or infinity")),
    Case("std-inf", "5", "--std inf", _plain("build", "--std", "inf", "--out", "TMP/o"),
         fragments=("--std", "NaN or infinity")),
    Case("std-zero", "5", "--std 0", _plain("build", "--std", "0", "--out", "TMP/o"),
         fragments=("std", "positive")),
    # 6. --model-kwargs on the bundled model
    *[Case(f"model-kwargs-{kw.split('=')[0]}", "6", f"--model-kwargs {kw} on the bundled model",
           _plain("build", "--model-kwargs", kw, "--out", "TMP/o"), fragments=("--model-kwargs", "not accepted"))
      for kw in ("depth=-1", "num_heads=5", "foo=1")],
    Case("model-kwargs-channels", "6", "--model-kwargs in_chans=2 (no such images)",
         _plain("build", "--model-kwargs", "in_chans=2", "--out", "TMP/o"), fragments=("1- or 3-channel",)),
    # 7. file names that are not UTF-8
    Case("non-utf8-eval", "7", "eval on class folders whose names are not UTF-8", _eval_on(_non_utf8), code=0,
         fragments=("on 10 images",)),
    Case("non-utf8-build", "7", "build whose data and class names are not UTF-8 (report.md)", _build_non_utf8,
         code=0, fragments=("wrote",), check=kept("o/report.md")),
    # 8. the in-process runtime
    Case("runs-but-fails", "8", "eval of a program that loads but fails when run",
         _runs_but_fails, fragments=("failed when run",)),
    Case("sparse-60gb-pte", "8", "eval of a 60 GB sparse .pte", _sparse_60gb, fragments=("GB",)),
    # 9. manifests
    Case("manifest-no-model", "9", "manifest without 'model'", damaged_manifest(lambda m: m.pop("model")),
         fragments=("no 'model'",)),
    Case("manifest-no-mean", "9", "manifest without input.mean",
         damaged_manifest(lambda m: m["input"].pop("mean")), fragments=("no 'mean'",)),
    Case("manifest-interpolation", "9", "manifest with an unknown interpolation",
         damaged_manifest(lambda m: m["input"].update(interpolation="cubic")), fragments=("interpolation",)),
    Case("manifest-size-0", "9", "manifest with input size 0",
         damaged_manifest(lambda m: m["input"].update(size=[0, 0])), fragments=("size",)),
    Case("manifest-crop-0", "9", "manifest with crop_pct 0",
         damaged_manifest(lambda m: m["input"].update(crop_pct=0)), fragments=("crop_pct",)),
    Case("manifest-string-classes", "9", "manifest with num_classes \"10\" (a string)",
         damaged_manifest(lambda m: m["model"].update(num_classes="10")), fragments=("num_classes",)),
    Case("manifest-not-json", "9", "manifest that is not JSON",
         lambda tmp, b: ["eval", str(_file(copy_build(b, tmp / "b"), "manifest.json", "{oops").parent)],
         fragments=("not JSON",)),
    # 10. threads
    Case("threads-absurd", "10", "bench --threads 100000", _plain("bench", "BUILD", "--threads", "100000"),
         fragments=("--threads 100000", "cores")),
    Case("threads-oversubscribed", "10", "bench --threads one more than the host's cores: a warning",
         _plain("bench", "BUILD", "--threads", str((os.cpu_count() or 1) + 1), "--runs", "1", "--no-record"),
         code=0, fragments=("note: --threads", "is more than the", "cores of host")),
    # 14. labels and folders
    Case("folders-named-as-labels", "14", "eval on folders named after the model's labels",
         _eval_on(_labels_as_folders), code=0, fragments=("classes by folder names = the model's labels",)),
    Case("folders-partly-labels", "14", "eval on folders of which only some are labels",
         _eval_on(_partial_labels), fragments=("only some class folders", "misc")),
    Case("class-folder-loop", "14", "a class folder that links to the data folder", _eval_on(_loop_link),
         fragments=("c9", "count twice")),
    Case("apple-double", "5/16", "AppleDouble ._*.png and .DS_Store files among the images",
         _eval_on(_apple_double), code=0, fragments=("on 10 images",)),
    # 15. preprocessing overrides
    Case("crop-pct-zero", "15", "--crop-pct 0", _plain("build", "--crop-pct", "0", "--out", "TMP/o"),
         fragments=("--crop-pct",)),
    Case("interpolation-unknown", "15", "--interpolation cubic",
         _plain("build", "--interpolation", "cubic", "--out", "TMP/o"), fragments=("--interpolation", "bicubic")),
    # 16. messages
    Case("click-usage", "16", "an unknown option", _plain("build", "--nope"),
         fragments=("No such option", "vitq-edge build --help")),
    Case("click-bad-value", "16", "a value of the wrong type", _plain("bench", "BUILD", "--runs", "many"),
         fragments=("--runs", "vitq-edge bench --help")),
    Case("bits-mixed-0", "16", "--bits mixed:0 for liu2021",
         _plain("build", "--recipe", "liu2021", "--bits", "mixed:0", "--out", "TMP/o"),
         fragments=("mixed:N (N from 4 to 8)",)),
    Case("pickled-checkpoint", "16", "a checkpoint holding a pickled module",
         lambda tmp, b: ["build", "--checkpoint", str(pickled_model(tmp / "model.pt")), "--out", str(tmp / "o")],
         fragments=("Python objects", "state_dict()"), absent=("weights_only",)),
    Case("data-is-a-file", "16", "eval --data FILE", lambda tmp, b: ["eval", str(b), "--data", str(_file(tmp))],
         fragments=("is a file",)),
    Case("out-empty", "16", "--out ''", _plain("build", "--out", ""), fragments=("--out is empty",)),
    # The suite's earlier cases (tests/test_cli.py), kept in the table.
    Case("unknown-model", "suite", "unknown timm model", _plain("build", "--model", "no_such_vit", "--out", "TMP/o"),
         fragments=("unknown model 'no_such_vit'",)),
    Case("unknown-target", "suite", "unknown target", _plain("build", "--target", "pdp11", "--out", "TMP/o"),
         fragments=("unknown target 'pdp11'", "rpi4")),
    Case("unknown-recipe", "suite", "unknown recipe", _plain("build", "--recipe", "magic", "--out", "TMP/o"),
         fragments=("unknown recipe 'magic'",)),
    Case("bits-unsupported", "suite", "--bits W4A4 for the stock int8 recipe",
         _plain("build", "--bits", "W4A4", "--out", "TMP/o"), fragments=("supports --bits W8A8",)),
    Case("not-a-vit", "suite", "a timm model that is not a ViT", _plain("build", "--model", "resnet18", "--out",
                                                                        "TMP/o"), fragments=("not a ViT",)),
    Case("model-kwargs-syntax", "suite", "--model-kwargs without =",
         _plain("build", "--model-kwargs", "depth", "--out", "TMP/o"), fragments=("key=value",)),
    Case("input-size-mismatch", "suite", "--input-size without a matching img_size",
         _plain("build", "--input-size", "32", "--out", "TMP/o"), fragments=("img_size",)),
    Case("mean-count", "suite", "--mean with 2 values for a 1-channel model",
         _plain("build", "--mean", "0.1,0.2", "--out", "TMP/o"), fragments=("--mean needs 1",)),
    Case("missing-checkpoint", "suite", "a checkpoint that does not exist",
         _plain("build", "--checkpoint", "TMP/nope.pt", "--out", "TMP/o"), fragments=("nope.pt", "does not exist")),
    Case("corrupt-checkpoint", "suite", "a checkpoint of random bytes",
         lambda tmp, b: ["build", "--checkpoint", str(_file(tmp, "corrupt.pt", "\x00garbage" * 40)), "--out",
                         str(tmp / "o")], fragments=("corrupt.pt", "not a readable torch file")),
    Case("empty-data", "suite", "a data folder with no images",
         lambda tmp, b: ["build", "--calib", str((tmp / "empty" / "a").mkdir(parents=True) or tmp / "empty"),
                         "--out", str(tmp / "o")], fragments=("holds no images",)),
    Case("missing-data", "suite", "a data folder that does not exist",
         _plain("build", "--calib", "TMP/missing", "--out", "TMP/o"), fragments=("missing", "does not exist")),
    Case("class-count", "suite", "eval data with 3 classes for a 10-class program",
         lambda tmp, b: ["eval", str(b), "--data", str(image_folder(tmp / "three", ["a", "b", "c"]))],
         fragments=("10 classes", "has 3")),
    Case("out-is-a-file", "suite", "--out is a file", lambda tmp, b: ["build", "--out", str(_file(tmp))],
         fragments=("not a folder",), check=kept("a_file")),
    Case("out-under-a-file", "suite", "--out below a file",
         lambda tmp, b: ["build", "--out", str(_file(tmp) / "out")], fragments=("cannot write output folder",)),
    Case("truncated-pte", "suite", "eval of a truncated .pte", _truncated_pte, fragments=("not a loadable",)),
    Case("missing-manifest", "suite", "eval of a .pte without its manifest.json", _lonely_pte,
         fragments=("manifest.json",)),
    Case("missing-program", "suite", "eval of a path that does not exist", _plain("eval", "TMP/nowhere"),
         fragments=("does not exist",)),
]
