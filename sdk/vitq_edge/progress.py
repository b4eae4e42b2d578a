"""Progress bars on stderr, on a terminal only; `--quiet` turns them off."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")

_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def _disabled() -> bool:
    # Off a terminal (a log file, a pipe, CI) a bar is hundreds of carriage-return updates,
    # and text that an error line would follow on the same line.
    return _quiet or not sys.stderr.isatty()


LOG_EVERY_S = 60.0  # off a terminal: at most one progress line a minute, none for shorter work


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it",
             log: bool = True) -> Iterator[T]:
    """A bar on a terminal; elsewhere (a log) a line with the ETA each LOG_EVERY_S of work,
    unless `log` is False (loops whose stages write their own lines, e.g. with StageClock)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if _disabled():
        return _logged(items, desc, total, unit) if log and not _quiet else iter(items)
    return iter(tqdm(items, desc=desc, total=total, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True))


def _logged(items: Iterable[T], desc: str, total: int | None, unit: str) -> Iterator[T]:
    start = last = time.monotonic()
    for done, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if now - last >= LOG_EVERY_S:
            last = now
            count = f"{done}/{total}" if total else str(done)
            status(f"{desc}: {count} {unit} ({_timing(now - start, done, total)})")


def _timing(elapsed: float, done: int, total: int | None) -> str:
    """'3.2 min so far, about 5 min left': the left part once some work is done and the total known."""
    left = f", about {elapsed / done * (total - done) / 60:.0f} min left" if done and total else ""
    return f"{elapsed / 60:.1f} min so far{left}"


@contextlib.contextmanager
def steps(desc: str, total: int) -> Iterator[Callable[[str], None]]:
    """A bar over `total` named stages; call the yielded function after each one."""
    bar = tqdm(total=total, desc=desc, unit="step", disable=_disabled(), file=sys.stderr, leave=False,
               dynamic_ncols=True)

    def done(stage: str) -> None:
        bar.set_postfix_str(stage)
        bar.update(1)

    try:
        yield done
    finally:
        bar.close()


def status(line: str) -> None:
    """A short line per stage of long work (kept in logs, where bars are off); silent with --quiet."""
    if not _quiet:
        tqdm.write(line, file=sys.stderr)


def close_bars() -> None:
    """Clear every live bar (before an error line, which must not share a line with one)."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


class StageClock:
    """Status lines for work in many similar stages (a recipe's units or ops): in logs, where bars
    are off, each stage says how far the work is and about how long is left."""

    def __init__(self, what: str, total: int) -> None:
        self.what, self.total, self.done, self.start = what, total, 0, time.monotonic()

    def begin(self, stage: str) -> None:
        timing = _timing(time.monotonic() - self.start, self.done, self.total)
        status(f"{self.what}: {stage} ({self.done + 1}/{self.total}, {timing})")
        self.done += 1
