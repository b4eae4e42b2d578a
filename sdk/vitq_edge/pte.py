"""Reading a .pte's structure: the one place that uses ExecuTorch's private flatbuffer reader."""

from __future__ import annotations

from typing import Any


def read_program(pte: bytes) -> Any | None:
    """The deserialized `executorch.exir.schema.Program` of `pte`; None when the bytes are not one."""
    # Imported here: ExecuTorch's exir takes seconds to import. The reader is private
    # (exir._serialize); ExecuTorch has no public one.
    from executorch.exir._serialize._program import deserialize_pte_binary

    try:
        return deserialize_pte_binary(pte).program
    except Exception:  # any malformed input: the callers' runtime load reports it better
        return None
