"""What a traced fx node's ``meta["val"]`` says about the tensor it produces (shared by the LM graph rewrites)."""
from __future__ import annotations

import torch
import torch.fx as fx


def node_tensor(n) -> torch.Tensor | None:
    """The example (fake) tensor recorded for ``n``, or None when ``n`` is not a node or made no tensor."""
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def node_shape(n) -> tuple | None:
    """``n``'s tensor shape as plain ints, or None."""
    v = node_tensor(n)
    return tuple(int(s) for s in v.shape) if v is not None else None
