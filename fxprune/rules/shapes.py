"""Size queries: ``x.shape``, ``x.size()``, ``x.size(d)``, ``x.numel()``, ``len(x)``.

Their results are ``SizeOf`` values that remember which tracked channels they count; the
analysis follows them through integer arithmetic, and finalize replaces a channel size that
reaches an op by the value the pruned graph needs (see passes/finalize.py). A query that reads no
tracked dim is an ordinary number.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.fx as fx

from fxprune.ir import ChannelMap, SizeOf
from fxprune.rules.base import Category, OpRule, arg, register_all

if TYPE_CHECKING:
    from fxprune.analysis import Walk

_NONE = np.zeros(0, dtype=np.int64)


def dim_sizes(xm: ChannelMap | None, ndim: int) -> SizeOf:
    """The SizeOf of ``x.shape``: one part per dim, tracked where the dim holds channels."""
    parts = []
    for d in range(ndim):
        if xm is not None and d in xm.dims:
            parts.append(SizeOf(np.unique(xm.ids[xm.ids >= 0])))
        else:
            parts.append(SizeOf(_NONE))
    return SizeOf.of(parts)


def _query(walk: "Walk", node: fx.Node) -> Any:
    x = node.args[0]
    if not walk.is_tensor(x):
        return None
    shape = dim_sizes(walk.map(x), len(walk.meta(x).shape))
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if name == "getattr":
        attr = node.args[1]
        if attr == "shape":
            return shape
        if walk.is_tensor(node):  # x.T, x.mT, x.data: a tensor view this rule cannot follow
            return walk.opaque(node, f"attribute .{attr} of a tracked tensor")
        return None  # dtype, device, ndim: no channel count
    if name == "size":
        d = arg(node, 1, "dim")
        return shape if d is None else shape.index(d)
    if name == "len":
        return shape.index(0)
    if name in ("numel", "nelement"):
        return SizeOf(shape.ids)
    return None  # dim, ndimension, type, get_device


QUERY = OpRule("size query", Category.SHAPE, _query)

register_all((getattr, len, torch.numel, "size", "dim", "numel", "ndimension", "nelement", "type", "get_device"),
             QUERY)
