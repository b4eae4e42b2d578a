"""Hold back what libraries write to stderr, so that an error line is the only line a user sees."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def held_stderr(keep: Callable[[str], bool] = lambda line: False) -> Iterator[None]:
    """Hold stderr while the block runs; afterwards pass on the lines `keep` accepts.

    Both `sys.stderr` (ExecuTorch's Python bindings log through it) and fd 2 (native code:
    libtiff, the runtime's C++) are held. On failure nothing is passed on: the error line
    that follows says what went wrong, and must be the only line.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    failed = True
    python_side = io.StringIO()
    with tempfile.TemporaryFile() as native_side:
        os.dup2(native_side.fileno(), 2)
        try:
            with contextlib.redirect_stderr(python_side):
                yield
            failed = False
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if not failed:
                native_side.seek(0)
                held = native_side.read().decode(errors="replace") + python_side.getvalue()
                sys.stderr.write("".join(line for line in held.splitlines(keepends=True) if keep(line)))
                sys.stderr.flush()
