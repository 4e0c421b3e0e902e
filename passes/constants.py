"""Per-channel constants that finalize reads off the graph instead of recording them.

A removed unit is exactly 0 right after its gate. Downstream it can stay a per-channel constant,
and where a consumer conv/linear reads it finalize must know its value: it folds the constant
into the consumer's bias or keeps the channel. The op rules say how a constant moves:
``per_channel`` ops (norms, activations) are run on one value per channel, ``keeps_zero`` ops
(pooling, resizing, zero padding, reductions over other dims) keep a zero channel zero,
element-wise ops (a residual add, an SE multiply) are run on their operands' constants, ``cat``
along the channels joins them, and data movement that leaves every channel label in place (a
flatten of [N, C, 1, 1]) carries them. Anything else (a conv's output, an input, an op without a
rule) is unknown: NaN.

Finalize then records, in its one run of the gated module, only the consumer inputs whose
removed channels are not known here. Recording costs real time (on mobilenet_v2 the run took
1.6x as long with its 52 taps as without); on torchvision's resnets, mobilenet_v2 and
efficientnet_b0 every removed channel is known to be zero, so none is recorded, and on
densenet121 the BN -> ReLU constants are computed (only the classifier's input, an average pool
of such a constant, is recorded). A constant computed wrongly here is not silent: finalize's
equivalence check compares the finalized module with the gated one.

    >>> import torch, torch.nn as nn, fxprune
    >>> from fxprune.passes import insert_gates
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    >>> gm = fxprune.trace(net, (torch.randn(1, 3, 8, 8),))
    >>> cg = fxprune.analyze(gm)
    >>> gated, gates = insert_gates(gm, cg)
    >>> with torch.no_grad(): gates[0].weight[:2] = 0.0
    >>> channel_constants(gated, cg)["_2"]  # the ReLU's output: units 0 and 1 are removed, zero
    tensor([0., 0., nan, nan])
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.node import map_aggregate

from fxprune.ir import ChannelGraph, ChannelMap
from fxprune.rules import Category, rule_for
from fxprune.rules.base import arg
from fxprune.passes.gates import is_gate
from fxprune.passes.sharing import get_tensor
from fxprune.passes.verify import eval_mode


class _Unknown(Exception):
    """An argument of the op has no per-channel constant."""


def channel_constants(gated: fx.GraphModule, cg: ChannelGraph) -> dict[str, torch.Tensor]:
    """Node name -> its value at each position along dim 1 where that is a known constant (NaN
    elsewhere), for the nodes of ``gated`` with at least one known position. Runs nothing but
    ops on one value per channel, in eval mode. Raises nothing: what cannot be followed is
    unknown."""
    modules = dict(gated.named_modules())
    known: dict[str, torch.Tensor] = {}
    with eval_mode(gated):
        for node in gated.graph.nodes:
            try:
                c = _constant(gated, cg, modules, known, node)
            except Exception:  # noqa: BLE001 - an op whose constants cannot be followed is recorded instead
                c = None
            if c is not None and not bool(c.isnan().all()):
                known[node.name] = c
    return known


def _meta(node: fx.Node) -> Any:
    """The traced value's ``TensorMeta`` (a gate's output is its anchor's)."""
    return (node.args[0] if is_gate(node) else node).meta.get("fxprune_value")


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    return getattr(_meta(node), "shape", None)


def _nan(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.full((n,), float("nan"), device=like.device)


def _constant(gm: fx.GraphModule, cg: ChannelGraph, modules: dict[str, nn.Module],
              known: dict[str, torch.Tensor], node: fx.Node) -> torch.Tensor | None:
    if is_gate(node):
        _, index, dim = node.args
        if dim != 1:
            return None
        v = modules[node.target].values().detach()
        if index is not None:
            v = v[gm.get_buffer(index.target)]
        return torch.where(v == 0, 0.0, float("nan")).float()
    if node.op not in ("call_module", "call_method", "call_function") \
            or not any(a.name in known for a in node.all_input_nodes):
        return None
    rule = rule_for(node, modules)
    shape = _shape(node)
    if rule is None or shape is None or len(shape) < 2:
        return None
    x = node.args[0] if node.args else None
    if rule.per_channel or rule.category is Category.COUPLE:
        return _evaluate(gm, modules, known, node, shape, broadcast=not rule.per_channel)
    if rule.keeps_zero is not None and isinstance(x, fx.Node) and x.name in known and rule.keeps_zero(node, modules):
        c = known[x.name]
        return torch.where(c == 0, 0.0, float("nan")) if c.numel() == shape[1] else None
    if rule.category is Category.CONCAT:
        tensors = arg(node, 0, "tensors")
        if not isinstance(tensors, (list, tuple)) or arg(node, 1, "dim", 0) % len(shape) != 1:
            return None
        like = next(known[t.name] for t in tensors if isinstance(t, fx.Node) and t.name in known)
        return torch.cat([known.get(t.name, _nan(_shape(t)[1], like)) for t in tensors])
    if rule.category is Category.MOVEMENT and isinstance(x, fx.Node) and x.name in known and _labels_stay(cg, x, node):
        return known[x.name]
    return None


def _labels_stay(cg: ChannelGraph, x: fx.Node, node: fx.Node) -> bool:
    """Whether ``node`` (pure data movement of ``x``) holds every channel of ``x`` at the same
    position along dim 1, and only there (flatten of [N, C, 1, 1] to [N, C])."""
    xm = cg.node_maps.get((x.args[0] if is_gate(x) else x).name)
    om = cg.node_maps.get(node.name)
    if not (isinstance(xm, ChannelMap) and isinstance(om, ChannelMap) and xm.dims == om.dims == (1,)):
        return False
    return bool((xm.ids >= 0).all()) and len(np.unique(xm.ids)) == xm.ids.size and np.array_equal(xm.ids, om.ids)


def _evaluate(gm: fx.GraphModule, modules: dict[str, nn.Module], known: dict[str, torch.Tensor],
              node: fx.Node, shape: tuple[int, ...], broadcast: bool) -> torch.Tensor | None:
    """Run ``node``'s op on one value per channel: known operands as [1, C, 1, ...] tensors and
    stored tensors as they are (for an element-wise op, ``broadcast``, only those that vary
    along the channels alone); None if another operand is a computed tensor, or the op fails
    or changes the channel count."""
    ndim, channels = len(shape), shape[1]

    def operand(a: Any) -> Any:
        if not isinstance(a, fx.Node):
            return a
        if a.name in known:
            a_shape = _shape(a)
            if a_shape is None or len(a_shape) != ndim or a_shape[1] != channels:
                raise _Unknown
            dtype = getattr(_meta(a), "dtype", torch.float32)
            return known[a.name].reshape([1, channels] + [1] * (ndim - 2)).to(dtype, copy=True)  # ops may work in place
        if a.op == "get_attr":
            value = get_tensor(gm, a.target)
            if broadcast:
                aligned = [1] * (ndim - value.dim()) + list(value.shape)
                if len(aligned) != ndim or any(s != 1 for i, s in enumerate(aligned) if i != 1):
                    raise _Unknown
            return value.detach().clone()
        raise _Unknown

    try:
        args, kwargs = map_aggregate(node.args, operand), map_aggregate(node.kwargs, operand)
        with torch.no_grad():
            if node.op == "call_module":
                out = modules[node.target](*args, **kwargs)
            elif node.op == "call_method":
                out = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                out = node.target(*args, **kwargs)
    except Exception:  # noqa: BLE001 - an op that cannot run on constants leaves them unknown
        return None
    if not isinstance(out, torch.Tensor) or out.numel() != channels:
        return None
    return out.detach().reshape(-1).float()
