"""Build folders: written atomically, read back with their manifest."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from vitq_edge.data.preprocess import Preprocess
from vitq_edge.errors import VitqError
from vitq_edge.lifetime import OwnedDir, sweep
from vitq_edge.runtime import ARITHMETIC_VERSION, UNRECORDED_ARITHMETIC

MANIFEST = "manifest.json"
PROGRAM = "model.pte"
REPORT = "report.md"


# What a build (and `bench`, beside it) writes into a build folder; nothing else may be there
# for a build to replace the folder.
BUILD_FILES = (PROGRAM, MANIFEST, REPORT)
_BUILD_EXTRAS = re.compile(r"profile-[A-Za-z0-9._-]+\.etdp|\.(manifest\.json|profile-[A-Za-z0-9._-]+\.etdp)\..+\.tmp")
# The manifest's marker: which program wrote it, and in what layout.
BUILD_FORMAT = "vitq-edge-build/1"


def is_build_manifest(manifest: dict) -> bool:
    """Whether a parsed manifest.json was written by `vitq-edge build`."""
    if manifest.get("format") == BUILD_FORMAT:
        return True
    # Builds from before the format marker: a manifest only vitq-edge writes.
    return isinstance(manifest.get("vitq_edge_version"), str) and manifest.get("program") == PROGRAM


def foreign_contents(folder: Path) -> str | None:
    """Why `folder` is not a build folder vitq-edge may replace; None if it is one (or empty)."""
    entries = sorted(p.name for p in folder.iterdir())
    if not entries:
        return None
    if MANIFEST not in entries:
        return f"holds {_listing(entries)} and no vitq-edge build"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or not is_build_manifest(manifest):
        return f"holds a {MANIFEST} that vitq-edge did not write (with {_listing(entries)})"
    others = [n for n in entries if n not in BUILD_FILES and not _BUILD_EXTRAS.fullmatch(n)]
    if others:
        return f"holds files a build does not write ({_listing(others)})"
    return None


def _listing(names: list[str], most: int = 4) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def check_output_folder(out: Path) -> None:
    """Refuse an --out the build may not replace: a file, or a folder holding anything but a build."""
    if out.is_symlink():
        raise VitqError(f"output path {out} is a symbolic link; pass the folder it points to as --out")
    if out.exists() and not out.is_dir():
        raise VitqError(f"output path {out} exists and is not a folder; choose another --out")
    if out.is_dir():
        try:
            reason = foreign_contents(out)
        except OSError as exc:
            raise VitqError(f"cannot read output folder {out} ({exc.strerror}); choose another --out") from None
        if reason:
            raise VitqError(f"output folder {out} {reason}; a build replaces its --out whole, so choose a new "
                            "or empty folder")


def check_checkpoint_path(path: Path) -> None:
    """Refuse a --checkpoint that is not a file, before any model is loaded."""
    if not path.is_file():
        raise VitqError(f"checkpoint {path} does not exist; pass the path of a saved state dict")


def check_inputs_outside(out: Path, inputs: dict[str, str | Path | None]) -> None:
    """Refuse inputs inside --out: replacing the folder would delete what the build reads."""
    out = Path(out).resolve()
    for flag, path in inputs.items():
        if path is None:
            continue
        resolved = Path(path).resolve()
        if resolved == out or resolved.is_relative_to(out):
            raise VitqError(f"{flag} {path} is inside the output folder {out}, which the build replaces; move it "
                            "elsewhere or choose another --out")


@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out` whole.

    `out` must be new, empty or an earlier build (`check_output_folder`). On any failure
    the temporary folder is removed and `out` is left as it was, so a failed build never
    leaves partial files behind; stage folders of builds that were killed are removed by
    the next build into the same place (vitq_edge.lifetime).
    """
    out = Path(out).absolute()
    check_output_folder(out)
    out = out.resolve()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for kind in ("tmp", "old"):
            sweep(out.parent, f".{out.name}.{kind}-")
        stage = OwnedDir(f".{out.name}.tmp-", out.parent)
        stage.path.chmod(0o777 & ~_umask())  # mkdtemp makes it private; a build folder is not
    except OSError as exc:
        raise VitqError(f"cannot write output folder {out} ({exc.strerror}); choose a writable --out") from None
    old = None
    try:
        yield stage.path
        check_output_folder(out)  # again: the folder may have changed during a long build
        if out.exists():
            old = OwnedDir(f".{out.name}.old-", out.parent)
            os.replace(out, old.path / "previous")
        stage.disown()
        os.replace(stage.path, out)
        stage.release(remove=False)
        if old is not None:
            old.release()
    except BaseException:
        stage.release()
        if old is not None and not out.exists():  # failed between the two renames: put the old build back
            os.replace(old.path / "previous", out)
            old.release()
        raise


def write_atomic(path: Path, write: Callable[[BinaryIO], None], mode: int | None = None) -> None:
    """Write `path` through `write(file)` into a temporary file beside it, then rename it into place.

    A reader never sees half a file (the data reaches the disk before the rename), and a
    failure or signal leaves no temporary file. The file gets `mode`, by default what the
    umask gives a new file (the temporary file starts private).
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise VitqError(f"cannot write {path} ({exc.strerror}); check the folder's permissions") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """The process's umask (reading it means setting it; it is put back at once)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def write_measurement(stem: Path, result: dict, lines: list[str]) -> None:
    """A tool's measurement as `stem`.json (the data) and `stem`.md (`lines`), each written atomically."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    text, md = json.dumps(result, indent=2) + "\n", "\n".join(lines) + "\n"
    write_atomic(stem.with_suffix(".json"), lambda f: f.write(text.encode()))
    write_atomic(stem.with_suffix(".md"), lambda f: f.write(md.encode()))


def locate_program(path: str | Path) -> tuple[Path, Path]:
    """A build folder or a .pte -> (the .pte, where its manifest.json would be); the .pte must exist."""
    path = Path(path)
    if path.is_dir():
        pte, manifest_path = path / PROGRAM, path / MANIFEST
    elif path.suffix == ".pte" or path.is_file():
        pte, manifest_path = path, path.parent / MANIFEST
    else:
        raise VitqError(f"{path} does not exist; pass a build folder or its model.pte")
    if not pte.is_file():
        raise VitqError(f"{pte} does not exist; run `vitq-edge build` first")
    return pte, manifest_path


def read_manifest(manifest_path: Path) -> dict:
    """A build's manifest.json, checked field by field for what readers use (one loader for all)."""
    def damaged(problem: str) -> VitqError:
        return VitqError(f"{manifest_path} is not a usable vitq-edge manifest ({problem}); rebuild with "
                         "`vitq-edge build`")

    try:
        manifest = json.loads(manifest_path.read_text())
    except OSError as exc:
        raise damaged(f"cannot read it: {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError):
        raise damaged("not JSON") from None
    if not isinstance(manifest, dict):
        raise damaged("not a JSON object")
    model = manifest.get("model")
    if not isinstance(model, dict):
        raise damaged("no 'model' object")
    num_classes = model.get("num_classes")
    if num_classes is not None and (type(num_classes) is not int or num_classes < 1):
        raise damaged(f"model.num_classes is {num_classes!r}, not a positive integer")
    labels = manifest.get("labels")
    if labels is not None:
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise damaged("'labels' is not a list of class names")
        if num_classes is not None and len(labels) != num_classes:
            raise damaged(f"{len(labels)} labels for {num_classes} classes")
    if not isinstance(manifest.get("input"), dict):
        raise damaged("no 'input' object")
    try:
        Preprocess.from_manifest(manifest["input"])
    except ValueError as exc:
        raise damaged(f"input: {exc}") from None
    return manifest


def resolve_build(path: str | Path) -> tuple[Path, dict]:
    """A build folder or a .pte with manifest.json beside it -> (pte path, manifest)."""
    pte, manifest_path = locate_program(path)
    if not manifest_path.is_file():
        raise VitqError(f"{manifest_path} is missing; a .pte needs the manifest.json written beside it by "
                        "`vitq-edge build`")
    return pte, read_manifest(manifest_path)


def program_arithmetic_version(manifest: dict) -> int | None:
    """The integer arithmetic a quantized build was made for; None for a stock program (fp32,
    XNNPACK's int8), whose bits do not depend on it."""
    quantization = manifest.get("quantization")
    if not isinstance(quantization, dict):
        return None
    return quantization.get("arithmetic_version", UNRECORDED_ARITHMETIC)


def check_arithmetic(manifest: dict, where: str | Path) -> None:
    """Refuse to run a program built for another integer arithmetic than this runtime computes:
    it would run, but give other results than its build measured and reported."""
    version = program_arithmetic_version(manifest)
    if manifest.get("kernels") and version != ARITHMETIC_VERSION:
        command = manifest.get("command")
        how = f"run `{command}` again" if isinstance(command, str) and command else "build it again"
        raise VitqError(f"{where} was built for integer arithmetic {version} and this vitq-edge computes "
                        f"{ARITHMETIC_VERSION}, so it would not give the results its build measured; {how}")


def append_to_manifest(manifest_path: Path, key: str, record: dict) -> int:
    """Append `record` to the manifest's list `key`, atomically; returns its index.

    The new manifest is written to a temporary file beside it and renamed over it, so a
    reader never sees half a file. A lock on the folder keeps two concurrent appends
    (two `vitq-edge bench` runs) from losing one another's record.
    """
    import fcntl

    manifest_path = Path(manifest_path)
    folder = manifest_path.parent
    try:
        lock = os.open(folder, os.O_RDONLY)
    except OSError as exc:
        raise VitqError(f"cannot open build folder {folder} ({exc.strerror})") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            manifest = json.loads(manifest_path.read_text())
            mode = manifest_path.stat().st_mode & 0o777
        except (OSError, json.JSONDecodeError):
            raise VitqError(f"{manifest_path} is not a readable vitq-edge manifest; rebuild with "
                            "`vitq-edge build`") from None
        entries = manifest.setdefault(key, [])
        entries.append(record)
        text = json.dumps(manifest, indent=2) + "\n"
        write_atomic(manifest_path, lambda f: f.write(text.encode()), mode=mode)  # keep the manifest's own mode
        return len(entries) - 1
    finally:
        os.close(lock)
