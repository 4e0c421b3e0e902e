"""Pure data movement (view, reshape, permute, flatten, indexing, channel shuffle), analysed by
running the op on a tensor of channel labels: where each label lands is where its channel went.

Finalize rewrites the literal sizes and slice bounds such ops spell out, but only at the dims that
hold channels: a literal at any other dim (a batch size, a spatial split, the fixed factor of a
channel shuffle) means the same after pruning.
"""
from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.node import map_aggregate

from fxprune.ir import ChannelMap
from fxprune.rules.base import Category, OpRule, Rewrite, arg, op_name, register_all

if TYPE_CHECKING:
    from fxprune.analysis import Walk

MOVEMENT_FUNCTIONS = (
    torch.flatten, torch.permute, torch.transpose, torch.swapaxes, torch.movedim,
    torch.squeeze, torch.unsqueeze, torch.flip, torch.roll, torch.t, torch.unflatten,
)
MOVEMENT_METHODS = (
    "flatten", "unflatten", "permute", "transpose", "swapaxes", "movedim", "squeeze",
    "unsqueeze", "expand_as", "t", "flip", "roll", "repeat", "view_as", "reshape_as",
)
SIZED_METHODS = ("view", "reshape", "expand")  # their literal sizes name channel counts
MOVEMENT_MODULES = (nn.Flatten, nn.Unflatten)


def _movement(walk: "Walk", node: fx.Node) -> Any:
    x = node.args[0]
    xm = walk.map(x)
    if not isinstance(xm, ChannelMap):
        return walk.opaque(node, f"{op_name(node)} on a tracked operand that is not its first")
    shape = walk.meta(x).shape
    if not _is_safe(walk, node, xm, len(shape)):
        return None
    labels = torch.arange(1, xm.ids.size + 1, dtype=torch.int64).reshape(xm.ids.shape)
    view = [shape[d] if d in xm.dims else 1 for d in range(len(shape))]
    out = _apply_on(walk, node, x, labels.reshape(view).expand(shape).contiguous())
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != walk.meta(node).shape:
        return walk.opaque(node, f"{op_name(node)} whose result could not be followed")
    vary = tuple(d for d in range(out.dim()) if out.shape[d] > 1 and not bool((out == out.narrow(d, 0, 1)).all()))
    if not vary:
        return walk.opaque(node, f"{op_name(node)} selecting single channels")
    reduced = out
    for d in range(out.dim()):
        if d not in vary:
            reduced = reduced.narrow(d, 0, 1)
    if not bool((out == reduced).all()):
        return walk.opaque(node, f"{op_name(node)} mixing channels with other dims")
    table = np.concatenate([[-1], xm.ids.ravel()])
    ids = table[reduced.reshape([out.shape[d] for d in vary]).numpy()]
    if len(vary) > 1:
        _couple_across(walk, ids, f"{op_name(node)} '{node.name}'")
    return ChannelMap(vary, ids)


def _getitem(walk: "Walk", node: fx.Node) -> Any:
    """Indexing a tensor moves data; indexing a tuple of maps (a split's parts) picks one."""
    base = walk.map(node.args[0])
    if walk.is_tensor(node.args[0]):
        return _movement(walk, node)
    if isinstance(base, (tuple, list)):
        return base[node.args[1]]
    return None


def _index_entries(index: Any, ndim: int) -> dict[int, Any]:
    """Which input dim each entry of a ``tensor[index]`` applies to (None adds no input dim)."""
    index = index if isinstance(index, tuple) else (index,)
    consumed = sum(1 for e in index if e is not None and e is not Ellipsis)
    out, d = {}, 0
    for e in index:
        if e is Ellipsis:
            d += ndim - consumed
        elif e is None:
            continue
        else:
            out[d] = e
            d += 1
    return out


def _is_safe(walk: "Walk", node: fx.Node, xm: ChannelMap, ndim: int) -> bool:
    """Reject movements that a smaller tensor would not reproduce (roll, indexing channels)."""
    if node.target in (torch.roll, "roll"):
        dims = arg(node, 2, "dims", None)
        if dims is None or {d % ndim for d in (dims if isinstance(dims, (tuple, list)) else (dims,))} & set(xm.dims):
            walk.opaque(node, "roll along the channels")
            return False
    if node.op == "call_function" and node.target is operator.getitem:
        for d, entry in _index_entries(node.args[1], ndim).items():
            if d in xm.dims and entry != slice(None) and not (
                isinstance(entry, slice) and entry.step in (None, 1)
                and all(isinstance(v, int) or v is None for v in (entry.start, entry.stop))
            ):
                walk.opaque(node, "indexing into the channels")
                return False
    return True


def _apply_on(walk: "Walk", node: fx.Node, x: fx.Node, label_tensor: torch.Tensor) -> Any:
    def concrete(a: Any) -> Any:
        if a is x:
            return label_tensor
        if isinstance(a, fx.Node):
            v = walk.meta(a)
            return torch.zeros(v.shape, dtype=v.dtype) if hasattr(v, "dtype") and hasattr(v, "shape") else v
        return a

    args = map_aggregate(node.args, concrete)
    kwargs = map_aggregate(node.kwargs, concrete)
    try:
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "call_module":
            return walk.module(node)(*args, **kwargs)
        return node.target(*args, **kwargs)
    except Exception:  # noqa: BLE001 - an op that cannot run on labels is treated as opaque
        return None


def _couple_across(walk: "Walk", ids: np.ndarray, where: str) -> None:
    """Channels spread over several dims: only one dim may shrink, the rest are tied.

    The kept dim is the one whose tying merges the fewest units that are still distinct (then
    the largest): a channel shuffle views, transposes and views back, and the second view
    must keep the dim the first one kept, or a 2 x 2 shuffle collapses into a single unit.
    """
    def cols(axis: int) -> np.ndarray:
        return np.moveaxis(ids, axis, -1).reshape(-1, ids.shape[axis])

    def merges(axis: int) -> int:
        c = cols(axis)
        tracked = np.where(c >= 0, walk.roots(np.where(c >= 0, c, 0)), -1)
        return sum(len(np.unique(tracked[:, j])) - 1 for j in range(c.shape[1]))

    keep = min(range(ids.ndim), key=lambda a: (merges(a), -ids.shape[a], -a))
    c = cols(keep)
    walk.couple(np.repeat(c[:1], c.shape[0], axis=0), c, where)


# ---- finalize: literal sizes and slice bounds at channel dims ----------------------------------
def kept_extents(rw: Rewrite, out: ChannelMap) -> dict[int, int]:
    """Pruned extent of each channel-holding dim of a tensor: a dim that holds units shrinks to
    its kept count; a dim whose positions are tied (a shuffle's fixed factor) keeps its size."""
    kept = rw.kept(out.ids.ravel()).reshape(out.ids.shape)
    extents = {}
    for axis, d in enumerate(out.dims):
        other = tuple(a for a in range(kept.ndim) if a != axis)
        extents[d] = int(kept.any(axis=other).sum()) if other else int(kept.sum())
    return extents


def _rewrite_sizes(rw: Rewrite, node: fx.Node) -> None:
    out = rw.map_of(node)
    if not isinstance(out, ChannelMap):
        return
    x, sizes = node.args[0], node.args[1:]
    packed = len(sizes) == 1 and isinstance(sizes[0], (tuple, list))
    flat = list(sizes[0]) if packed else list(sizes)
    for d, extent in kept_extents(rw, out).items():
        if d < len(flat) and isinstance(flat[d], int) and flat[d] != -1:
            flat[d] = extent
    node.args = (x,) + ((tuple(flat),) if packed else tuple(flat))


def _rewrite_index(rw: Rewrite, node: fx.Node) -> None:
    x = node.args[0]
    xm = rw.map_of(x)
    if not isinstance(xm, ChannelMap) or len(xm.dims) != 1:
        return
    index = node.args[1]
    items = list(index) if isinstance(index, tuple) else [index]
    kept = rw.kept(xm.ids)
    ndim = len(x.meta["fxprune_value"].shape)
    consumed = sum(1 for v in items if v is not None and v is not Ellipsis)
    pos = 0
    for i, e in enumerate(items):
        if e is None:
            continue
        if e is Ellipsis:
            pos += ndim - consumed
            continue
        if pos == xm.dims[0] and isinstance(e, slice) and e != slice(None):
            start, stop, _ = e.indices(len(kept))
            items[i] = slice(int(kept[:start].sum()), int(kept[:stop].sum()), e.step)
        pos += 1
    node.args = (x, tuple(items) if isinstance(index, tuple) else items[0])


MOVEMENT = OpRule("movement", Category.MOVEMENT, _movement)
SIZED = OpRule("view / reshape / expand", Category.MOVEMENT, _movement, rewrite=_rewrite_sizes)
GETITEM = OpRule("getitem", Category.MOVEMENT, _getitem, rewrite=_rewrite_index)

register_all(MOVEMENT_FUNCTIONS + MOVEMENT_METHODS + MOVEMENT_MODULES, MOVEMENT)
register_all(SIZED_METHODS + (torch.reshape,), SIZED)
register_all((operator.getitem,), GETITEM)
