"""Ops over several tensors: element-wise ops couple their operands' channels (residual add, SE
multiply); ``cat`` concatenates channel maps; ``split``/``chunk`` take sub-ranges of one.
"""
from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.fx as fx

from fxprune.ir import ChannelMap
from fxprune.rules.base import Category, OpRule, Rewrite, arg, op_name, register_all

if TYPE_CHECKING:
    from fxprune.analysis import Walk

ELEMENTWISE_FUNCTIONS = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
    operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
    torch.maximum, torch.minimum,
)
ELEMENTWISE_METHODS = tuple(n + s for n in ("add", "sub", "mul", "div", "maximum", "minimum") for s in ("", "_"))
CAT_FUNCTIONS = (torch.cat, torch.concat, torch.concatenate)
SPLIT_FUNCTIONS = (torch.split, torch.chunk, torch.tensor_split)
SPLIT_METHODS = ("split", "chunk")


def couple_operands(walk: "Walk", node: fx.Node, operands: list[Any]) -> Any:
    """Element-wise coupling with broadcasting: mapped operands unite position by position; an
    untracked full-size operand blocks them unless it is a stored tensor, which is then sliced."""
    out_shape = walk.meta(node).shape
    out_ndim = len(out_shape)
    aligned = []
    for o in operands:
        m = walk.map(o)
        if walk.is_tensor(o) and isinstance(m, ChannelMap):
            shift = out_ndim - len(walk.meta(o).shape)
            aligned.append(ChannelMap(tuple(d + shift for d in m.dims), m.ids))
    layouts = {m.dims for m in aligned}
    if len(layouts) != 1:
        return walk.opaque(node, f"{op_name(node)} combines channels laid out on different dims {sorted(layouts)}")
    (dims,) = layouts
    full = tuple(out_shape[d] for d in dims)
    base = next((m for m in aligned if m.ids.shape == full), None)
    if base is None:
        return None  # only broadcast (size-1) channel maps: nothing couples
    where = f"{op_name(node)} '{node.name}'"
    for m in aligned:
        if m is not base and m.ids.shape == full:
            walk.couple(base.ids, m.ids, where)
    for o in operands:
        if not walk.is_tensor(o) or walk.map(o) is not None:
            continue
        shape = walk.meta(o).shape
        shift = out_ndim - len(shape)
        if all((shape[d - shift] if d - shift >= 0 else 1) == 1 for d in dims):
            continue  # broadcast along the channels
        stored = stored_source(walk, o, dims[0] - shift) if len(dims) == 1 else None
        if stored is not None:
            source, pdim = stored
            walk.bind(source.target, pdim, base.ids, where)
            if not _zero_preserving(node, o):  # x + pos_embed, cat([cls_token, x]): a removed
                walk.add_site(source.name, pdim, base.ids)  # channel is zero only if it is gated too
        else:
            walk.block(base, f"{where} combines channels with untracked tensor '{o.name}'")
    return ChannelMap(dims, base.ids)


PRODUCTS = frozenset((operator.mul, operator.imul, torch.mul, "mul", "mul_"))
QUOTIENTS = frozenset((operator.truediv, operator.itruediv, torch.div, "div", "div_"))
SUMS = frozenset((operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub, "add", "add_", "sub",
                  "sub_"))
_SAME_LAYOUT_METHODS = ("to", "type", "type_as", "float", "half", "bfloat16", "double", "contiguous", "clone",
                        "detach")
_EXPAND_METHODS = ("expand", "expand_as", "broadcast_to")


def _zero_preserving(node: fx.Node, operand: fx.Node) -> bool:
    """A zero channel of the other operands stays zero whatever ``operand`` holds: a product, or
    a quotient with ``operand`` as the divisor."""
    return node.target in PRODUCTS or (node.target in QUOTIENTS and bool(node.args) and node.args[0] is not operand)


def _size_args(node: fx.Node) -> tuple[Any, ...]:
    """The sizes of ``x.view(a, b)`` / ``x.expand((a, b))``, written either way."""
    sizes = node.args[1:]
    return tuple(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)) else tuple(sizes)


def stored_source(walk: "Walk", node: fx.Node, dim: int) -> tuple[fx.Node, int] | None:
    """The parameter/buffer (its get_attr node) and its dim that dim ``dim`` of ``node`` reads one
    to one, through casts, copies, ``unsqueeze``, reshapes that only add or drop size-1 dims and
    expansions that keep that dim (a ViT's class token,
    ``cls_token.expand(B, -1, -1)``, joins the embedding channels): slicing it slices ``node``.
    None when ``node`` is computed otherwise, or an expansion names that dim's size (-1 keeps
    it; a literal size would not follow the pruned width)."""
    while node.op != "get_attr":
        if not node.args or not isinstance(node.args[0], fx.Node):
            return None
        src = node.args[0]
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        if node.op not in ("call_method", "call_function"):
            return None
        if name in _SAME_LAYOUT_METHODS and node.op == "call_method":
            node = src
            continue
        if name == "unsqueeze":
            at = arg(node, 1, "dim") % len(walk.meta(node).shape)
            if at == dim:
                return None
            dim, node = dim - (dim > at), src
            continue
        if name in ("reshape", "view") and node.op == "call_method":  # gamma.reshape(1, -1, 1, 1)
            sizes = _size_args(node)
            out_shape, in_shape = walk.meta(node).shape, walk.meta(src).shape
            solid = [d for d, n in enumerate(out_shape) if n != 1]
            if dim not in solid or len(sizes) != len(out_shape) or sizes[dim] != -1 \
                    or [out_shape[d] for d in solid] != [n for n in in_shape if n != 1]:
                return None
            dim, node = [d for d, n in enumerate(in_shape) if n != 1][solid.index(dim)], src
            continue
        if name in _EXPAND_METHODS:
            shift = len(walk.meta(node).shape) - len(walk.meta(src).shape)
            sizes = _size_args(node) if name == "expand" else ()
            if dim < shift or walk.meta(src).shape[dim - shift] != walk.meta(node).shape[dim] or (
                    name == "expand" and sizes[dim] != -1) or name == "broadcast_to":
                return None
            dim, node = dim - shift, src
            continue
        return None
    return node, dim


def _elementwise(walk: "Walk", node: fx.Node) -> Any:
    if not walk.is_tensor(node):
        return walk.opaque(node, f"{op_name(node)} with a non-tensor result")
    operands = list(node.args) + [v for k, v in node.kwargs.items() if k in ("other", "input")]
    return couple_operands(walk, node, operands)


def _cat(walk: "Walk", node: fx.Node) -> Any:
    tensors = list(arg(node, 0, "tensors"))
    dim = arg(node, 1, "dim", 0) % len(walk.meta(node).shape)
    maps = [walk.map(t) for t in tensors]
    if all(m is None or m.dims == (dim,) for m in maps):
        parts = [m.ids if m is not None else np.full(walk.meta(t).shape[dim], -1, np.int64)
                 for t, m in zip(tensors, maps)]
        return ChannelMap((dim,), np.concatenate(parts))
    if any(m is not None and dim in m.dims for m in maps):
        return walk.opaque(node, "cat mixing channel layouts")
    return couple_operands(walk, node, tensors)


def _split_dim(walk: "Walk", node: fx.Node) -> int:
    return arg(node, 2, "dim", 0) % len(walk.meta(node.args[0]).shape)


def _split(walk: "Walk", node: fx.Node) -> Any:
    x = node.args[0]
    xm = walk.map(x)
    outs = walk.meta(node)
    if xm is None or not isinstance(outs, (tuple, list)):
        return walk.opaque(node, "split with an unexpected operand or result")
    dim = _split_dim(walk, node)
    if dim not in xm.dims:
        return tuple(xm for _ in outs)
    if xm.dims != (dim,):
        return walk.opaque(node, "split of channels laid out on several dims")
    parts, start = [], 0
    for o in outs:
        n = o.shape[dim]
        parts.append(ChannelMap((dim,), xm.ids[start:start + n]))
        start += n
    return tuple(parts)


def _rewrite_split(rw: Rewrite, node: fx.Node) -> None:
    """A split *along the channels* becomes ``torch.split`` with the kept size of each part; a
    split along any other dim keeps its literal sizes."""
    x, out = node.args[0], rw.map_of(node)
    xm = rw.map_of(x)
    if not (isinstance(out, tuple) and isinstance(xm, ChannelMap) and len(xm.dims) == 1):
        return
    dim = arg(node, 2, "dim", 0) % len(x.meta["fxprune_value"].shape)
    if dim != xm.dims[0]:
        return
    sizes = [int(rw.kept(m.ids).sum()) for m in out]
    with rw.gm.graph.inserting_before(node):
        new = rw.gm.graph.call_function(torch.split, (x, sizes), {"dim": dim})
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    rw.gm.graph.erase_node(node)


ELEMENTWISE = OpRule("element-wise", Category.COUPLE, _elementwise)
CAT = OpRule("cat", Category.CONCAT, _cat)
SPLIT = OpRule("split", Category.SPLIT, _split, rewrite=_rewrite_split)

register_all(ELEMENTWISE_FUNCTIONS + ELEMENTWISE_METHODS, ELEMENTWISE)
register_all(CAT_FUNCTIONS, CAT)
register_all(SPLIT_FUNCTIONS + SPLIT_METHODS, SPLIT)
