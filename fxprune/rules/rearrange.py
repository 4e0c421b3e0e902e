"""einops' ``rearrange`` and ``reduce``: the pattern names every axis, so channels are followed.

The trace records each call as one node (``tracing._autowrapped``). The channel axis must be an
axis of its own on both sides of the pattern, possibly moved, while the other axes group, split
and permute freely (``"b c h w -> b (h w) c"``, ``"b c (h p) (w q) -> b c h w p q"``). Refused,
with the reason: the channels split or merged with other axes (``"b (g c) h w -> ..."``), given a
size in the call (a literal width), or reduced away (``reduce`` over them).

Registered only where einops is installed (a test-only extra of fxprune).
"""
from __future__ import annotations

import importlib.util
import re
from typing import TYPE_CHECKING, Any

import torch.fx as fx

from fxprune.ir import ChannelMap
from fxprune.rules.base import Category, OpRule, register_all

if TYPE_CHECKING:
    from fxprune.analysis import Walk


def slots(side: str, ellipsis: int) -> list[list[str]] | None:
    """One entry per dim: its axis names (``[]`` for a unit dim ``1`` / ``()``), ``...`` expanded
    to ``ellipsis`` single axes named ``…0``, ``…1`` (inside parentheses: one group). None for a
    pattern this parser does not read."""
    out: list[list[str]] = []
    group: list[str] | None = None
    for t in re.findall(r"\(|\)|\.\.\.|\w+", side):
        if t == "(":
            if group is not None:
                return None
            group = []
        elif t == ")":
            if group is None:
                return None
            out.append(group)
            group = None
        else:
            names = [f"…{i}" for i in range(ellipsis)] if t == "..." else ([] if t == "1" else [t])
            if group is not None:
                group.extend(names)
            elif t == "...":
                out.extend([n] for n in names)
            else:
                out.append(names)
    return out if group is None else None


def _rearrange(walk: "Walk", node: fx.Node) -> Any:
    x, pattern = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("pattern")
    xm = walk.map(x)
    if xm is None:
        return walk.opaque(node, f"{node.target.__name__} of a tracked operand that is not its first")
    if not isinstance(pattern, str) or "->" not in pattern:
        return walk.opaque(node, f"{node.target.__name__} with a pattern that is not a string")
    where = f"{node.target.__name__} '{pattern}' at '{node.name}'"
    lhs_text, rhs_text = pattern.split("->")
    ndim = len(walk.meta(x).shape)
    ellipsis = ndim - len(slots(lhs_text, 0) or []) if "..." in lhs_text else 0
    lhs = slots(lhs_text, ellipsis)
    if lhs is None or len(lhs) != ndim or len(xm.dims) != 1:
        return walk.opaque(node, f"{where}: a pattern or channel layout it does not follow")
    axis = lhs[xm.dims[0]]
    if len(axis) != 1:
        return walk.opaque(node, f"{where} splits the channels into several axes")
    (name,) = axis
    rhs = slots(rhs_text, ellipsis)
    if rhs is None:
        return walk.opaque(node, f"{where}: a pattern it does not follow")
    if name in node.kwargs:
        return walk.opaque(node, f"{where} gives the channel axis '{name}' a literal size")
    holder = next((i for i, s in enumerate(rhs) if name in s), None)
    if holder is None:
        return walk.opaque(node, f"{where} reduces the channels away")
    if rhs[holder] != [name]:
        return walk.opaque(node, f"{where} merges the channels with other axes")
    return ChannelMap((holder,), xm.ids)


REARRANGE = OpRule("einops rearrange", Category.MOVEMENT, _rearrange)

if importlib.util.find_spec("einops") is not None:
    import einops

    register_all((einops.rearrange, einops.reduce), REARRANGE)
