"""Nothing left behind: owned temporary folders, children that die with us, SIGTERM as Ctrl-C.

A process killed by SIGKILL runs no cleanup code, so cleanup cannot rely on it:

- Every temporary or stage folder vitq-edge makes holds a marker file and stays locked
  (flock on the folder) while its owner lives; the kernel drops the lock however the
  owner died. The next command removes folders that carry our prefix and marker and
  whose lock it can take: those, and only those, are ours and abandoned.
- Child processes (qemu, the runner, ssh) start under `setpriv --pdeathsig TERM` and a
  small shell that kills its command when that signal comes, so they end with us.
- SIGTERM and SIGHUP (what `timeout`, CI cancellation, `docker stop` and a closed
  terminal send) raise `Terminated`, a KeyboardInterrupt: every `finally` and context
  manager that cleans up after Ctrl-C cleans up after them too. A signal that lands in a
  finalizer or weakref callback (torch runs many) would be printed and dropped there by
  Python; it is raised again a moment later instead, outside.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

MARKER = ".vitq-edge-owned"

# Prefixes of the folders vitq-edge makes in the temporary directory (see sweep_temp).
TEMP_PREFIXES = ("vitq-eval-", "vitq-run-", "vitq-ssh-run-", "vq-ssh-")
# Where ssh's control sockets go: unix socket paths are limited to ~104 bytes, and
# $TMPDIR can be long.
SHORT_TEMP = "/tmp" if os.path.isdir("/tmp") else None


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived; unwinds like Ctrl-C so cleanup code runs."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum: int, frame) -> None:
    raise Terminated(signum)


# The signal of a `Terminated` that Python dropped, raised again when SIGALRM comes.
_dropped: int | None = None
# The delay before that: long enough that the timer does not fire inside the hook below.
_REDELIVERY_S = 0.02


def _raise_dropped(signum: int, frame) -> None:
    global _dropped
    if _dropped is not None:
        dropped, _dropped = _dropped, None  # dropped again: the hook sets it again
        raise Terminated(dropped)


def _on_unraisable(unraisable) -> None:
    """Python calls this for an exception it cannot raise (in `__del__`, weakref callbacks)."""
    global _dropped
    if isinstance(unraisable.exc_value, Terminated):
        _dropped = unraisable.exc_value.signum
        signal.setitimer(signal.ITIMER_REAL, _REDELIVERY_S)
        return
    sys.__unraisablehook__(unraisable)


def handle_termination() -> None:
    """Turn SIGTERM and SIGHUP into `Terminated` (call once, from the main thread)."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_terminated)
    signal.signal(signal.SIGALRM, _raise_dropped)
    sys.unraisablehook = _on_unraisable


def run_script(main: Callable[[], int | None]) -> None:
    """The entry point of a tools/ script: SIGTERM and SIGHUP unwind like Ctrl-C (cleanup runs), and a
    VitqError, a stop or an interrupt ends it with one `error:` line instead of a traceback."""
    from vitq_edge.errors import VitqError

    handle_termination()
    try:
        code = main()
    except VitqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except Terminated as exc:
        print(f"error: stopped by {exc}", file=sys.stderr)
        code = 128 + exc.signum
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code or 0)


class OwnedDir:
    """A folder made by this process, marked and locked until `release()` or process death."""

    def __init__(self, prefix: str, parent: Path | str | None = None):
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        self._fd: int | None = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        # The marker comes after the lock: a sweeper that sees it can trust the lock.
        (self.path / MARKER).touch()

    def disown(self) -> None:
        """Drop the marker (e.g. before renaming the folder into place); the lock is kept."""
        with contextlib.suppress(FileNotFoundError):
            (self.path / MARKER).unlink()

    def release(self, remove: bool = True) -> None:
        if remove:
            shutil.rmtree(self.path, ignore_errors=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@contextlib.contextmanager
def owned_temp_dir(prefix: str, parent: Path | str | None = None) -> Iterator[Path]:
    """A temporary folder removed on every exit path, or by the next command if we are killed."""
    sweep(Path(parent or tempfile.gettempdir()), prefix)
    owned = OwnedDir(prefix, parent)
    try:
        yield owned.path
    finally:
        owned.release()


def sweep(parent: Path, prefix: str) -> list[Path]:
    """Remove abandoned folders `parent/<prefix>*` that we made (marker) and nobody holds (lock)."""
    removed = []
    try:
        entries = [p for p in parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return removed
    for path in entries:
        if path.is_symlink() or not path.is_dir() or not (path / MARKER).is_file():
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # its owner is alive
            continue
        try:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed


def sweep_temp() -> None:
    """Remove what killed vitq-edge commands left in the temporary directory."""
    for parent in {Path(tempfile.gettempdir()), Path(SHORT_TEMP or tempfile.gettempdir())}:
        for prefix in TEMP_PREFIXES:
            sweep(parent, prefix)


# A shell between us and the command: it forwards our death (the TERM that setpriv's
# --pdeathsig sends it) to the command as SIGKILL. The command runs as its child, not
# exec'd, which also keeps Linux from carrying this large process's peak RSS into the
# command's getrusage (ru_maxrss survives fork+exec, not a second fork).
_GUARD = ('trap \'kill -KILL "$child" 2>/dev/null; wait "$child"; exit 143\' TERM HUP INT; '
          '"$@" & child=$!; wait "$child"')


def guarded(cmd: list[str]) -> list[str]:
    """`cmd` wrapped so it ends when this process ends, however it ends."""
    words = ["/bin/sh", "-c", _GUARD, "sh", *cmd]
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *words] if setpriv else words
