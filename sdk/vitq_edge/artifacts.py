"""Build folders: written atomically, read back with their manifest."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from vitq_edge.errors import VitqError

MANIFEST = "manifest.json"
PROGRAM = "model.pte"
REPORT = "report.md"


@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out` whole.

    On any failure the temporary folder is removed and `out` is left as it was, so
    a failed build never leaves partial files behind.
    """
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise VitqError(f"output path {out} exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        # Replacing the folder whole would delete whatever the user keeps there.
        raise VitqError(f"output folder {out} holds files but no earlier build; choose a new or empty --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        stage.chmod(0o777 & ~umask)  # mkdtemp makes it private; a build folder is not
    except OSError as exc:
        raise VitqError(f"cannot write output folder {out} ({exc.strerror}); choose a writable --out") from None
    try:
        yield stage
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "previous")
        os.replace(stage, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


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


def resolve_build(path: str | Path) -> tuple[Path, dict]:
    """A build folder or a .pte with manifest.json beside it -> (pte path, manifest)."""
    pte, manifest_path = locate_program(path)
    if not manifest_path.is_file():
        raise VitqError(f"{manifest_path} is missing; a .pte needs the manifest.json written beside it by "
                        "`vitq-edge build`")
    try:
        manifest = json.loads(manifest_path.read_text())
        manifest["input"]  # noqa: B018 - the field every reader needs
    except (json.JSONDecodeError, KeyError, TypeError):
        raise VitqError(f"{manifest_path} is not a vitq-edge manifest; rebuild with `vitq-edge build`") from None
    return pte, manifest


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
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{manifest_path.name}.", suffix=".tmp", dir=folder)
        except OSError as exc:
            raise VitqError(f"cannot write {manifest_path} ({exc.strerror}); check the folder's permissions") from None
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(manifest, indent=2) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, mode)  # mkstemp makes it private; keep the manifest's own mode
            os.replace(tmp, manifest_path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return len(entries) - 1
    finally:
        os.close(lock)
