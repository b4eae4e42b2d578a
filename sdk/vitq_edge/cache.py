"""Where downloads and converted weights are kept between runs: the user's cache folder."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """$VITQ_CACHE_DIR, else $XDG_CACHE_HOME/vitq-edge, else ~/.cache/vitq-edge (plus `parts`), created."""
    root = os.environ.get("VITQ_CACHE_DIR")
    if root:
        base = Path(root).expanduser()
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "vitq-edge"
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
