"""The `vitq` torch library and `define`, which registers one op's schema, out variant and reference.

A leaf: the op modules import it, `lower/ops/__init__.py` imports the op modules.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

LIBRARY = torch.library.Library("vitq", "DEF")  # noqa: TOR901 (Library("DEF") keeps int args as int)


def define(name: str, args: str, reference: Callable[..., torch.Tensor],
           fake: Callable[..., torch.Tensor]) -> None:
    """Define `vitq::name(args) -> Tensor` and `vitq::name.out(args, *, Tensor(a!) out)`."""
    LIBRARY.define(f"{name}({args}) -> Tensor")
    LIBRARY.define(f"{name}.out({args}, *, Tensor(a!) out) -> Tensor(a!)")
    LIBRARY.impl(name, reference, "CompositeExplicitAutograd")

    def out_variant(*args, out: torch.Tensor) -> torch.Tensor:
        result = reference(*args)
        out.resize_(result.shape)
        out.copy_(result)
        return out

    LIBRARY.impl(f"{name}.out", out_variant, "CompositeExplicitAutograd")
    torch.library.register_fake(f"vitq::{name}")(fake)
