"""Ops that keep every channel where it is: element-wise activations, spatial ops (pooling,
padding, resizing), softmax and reductions over other dims. ``elementwise`` is the rule a user
registers for a custom activation.
"""
from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxprune.ir import ChannelMap
from fxprune.rules.base import Category, OpRule, Rewrite, always, arg, op_name, register_all

if TYPE_CHECKING:
    from fxprune.analysis import Walk

try:
    from torchvision.ops import StochasticDepth
except ImportError:  # pragma: no cover - torchvision is a dependency
    StochasticDepth = None


def _with_inplace(names: set[str]) -> set[str]:
    return names | {n + "_" for n in names}


UNARY_FUNCTIONS = (
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.sigmoid,
    F.tanh, F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus, F.softsign, F.dropout,
    F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout, F.logsigmoid,
    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.abs, torch.neg, torch.sqrt,
    torch.clamp, torch.clip, torch.square, torch.erf, operator.neg, F.relu_, torch.relu_,
    torch.sigmoid_, torch.tanh_, torch.clone, torch.detach,
)
UNARY_METHODS = _with_inplace(
    {"relu", "sigmoid", "tanh", "exp", "abs", "neg", "sqrt", "clamp", "clip", "square", "erf"}
) | {"contiguous", "clone", "detach", "float", "half", "double", "bfloat16", "to", "type_as"}
UNARY_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Threshold, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.LogSigmoid,
) + ((StochasticDepth,) if StochasticDepth is not None else ())

ZERO_AT_ZERO_FUNCTIONS = frozenset((
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.tanh, F.hardswish,
    F.hardtanh, F.softsign, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.relu, torch.tanh, torch.abs,
    torch.neg, torch.sqrt, torch.square, torch.erf, operator.neg, F.relu_, torch.relu_, torch.tanh_, torch.clone,
    torch.detach,
))
ZERO_AT_ZERO_METHODS = _with_inplace({"relu", "tanh", "abs", "neg", "sqrt", "square", "erf"}) | {
    "contiguous", "clone", "detach", "float", "half", "double", "bfloat16", "to", "type_as"}
ZERO_AT_ZERO_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Hardswish,
    nn.Hardtanh, nn.Softsign, nn.Tanhshrink, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
) + ((StochasticDepth,) if StochasticDepth is not None else ())

SPATIAL_FUNCTIONS = (
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, F.upsample,
    torch.max_pool1d, torch.max_pool2d, torch.avg_pool1d, torch.adaptive_avg_pool1d,
)
SPATIAL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d,
    nn.ReplicationPad2d,
)
# Padding with a fill value: a zero channel stays zero only where the fill is zero.
PAD_FUNCTIONS = (F.pad,)
PAD_MODULES = (nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)
SOFTMAX = ((F.softmax, F.log_softmax, torch.softmax, torch.log_softmax), ("softmax", "log_softmax"),
           (nn.Softmax, nn.LogSoftmax))
REDUCTIONS = ((torch.mean, torch.sum, torch.amax, torch.amin), ("mean", "sum", "amax", "amin"))


def _unary(walk: "Walk", node: fx.Node) -> Any:
    x = node.args[0]
    out = walk.meta(node)
    if not walk.is_tensor(x) or not hasattr(out, "shape") or out.shape != walk.meta(x).shape:
        return walk.opaque(node, f"{op_name(node)} changes the shape")
    return walk.map(x)


def _spatial(walk: "Walk", node: fx.Node) -> Any:
    x = node.args[0]
    if node.target is F.pad:
        pad = arg(node, 1, "pad")
        if not isinstance(pad, (tuple, list)) or len(pad) // 2 > len(walk.meta(x).shape) - 2:
            return walk.opaque(node, "pad along the channel dim")
    out = walk.meta(node)
    shape = walk.meta(x).shape
    if not hasattr(out, "shape") or len(out.shape) != len(shape) or out.shape[1] != shape[1]:
        return walk.opaque(node, f"{op_name(node)} with an unexpected output")
    return walk.channel_map(node, x)


def _pads_zero(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    fill = getattr(modules[node.target], "value", 0) if node.op == "call_module" else arg(node, 3, "value", None)
    return fill is None or fill == 0


def _softmax(walk: "Walk", node: fx.Node) -> Any:
    xm = walk.map(node.args[0])
    ndim = len(walk.meta(node.args[0]).shape)
    dim = walk.module(node).dim if node.op == "call_module" else arg(node, 1, "dim")
    if xm is not None and (dim is None or dim % ndim in xm.dims):
        walk.block(xm, f"softmax at '{node.name}' normalizes over the channels")
    return xm


def zero_at_zero(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """``node`` is an element-wise op of one tensor with f(0) = 0 (ReLU, GELU, SiLU, tanh, dropout,
    casts ...): a removed channel that is zero stays zero (sigmoid, exp, clamp do not qualify)."""
    if node.op == "call_module":
        return isinstance(modules.get(node.target), ZERO_AT_ZERO_MODULES)
    if node.op == "call_method":
        return node.target in ZERO_AT_ZERO_METHODS
    return node.op == "call_function" and node.target in ZERO_AT_ZERO_FUNCTIONS


def _reduce(walk: "Walk", node: fx.Node, dim: Any, keepdim: bool, over_channels: bool) -> Any:
    """A reduction of the first operand over ``dim``. Over other dims the channels stay; over
    every channel dim it is exact only where the removed channels are zero and add nothing
    (``over_channels``: a sum, a mean rescaled at finalize, a p-norm with p > 0); the result then
    holds no channels."""
    x = node.args[0]
    xm = walk.map(x)
    if xm is None:
        return walk.opaque(node, f"{op_name(node)} of a tracked operand that is not its first")
    ndim = len(walk.meta(x).shape)
    if dim is None or not walk.is_tensor(node):
        return walk.opaque(node, f"{op_name(node)} over all dims")
    reduced = {d % ndim for d in (dim if isinstance(dim, (tuple, list)) else (dim,))}
    if reduced & set(xm.dims):
        if not (over_channels and set(xm.dims) <= reduced):
            return walk.opaque(node, f"{op_name(node)} over the channel dim")
        if not walk.removed_are_zero(x):
            return walk.opaque(node, f"{op_name(node)} over the channel dim, where removed channels are not known "
                                     "to be zero (they would count)")
        return None
    dims = tuple(d if keepdim else d - sum(r < d for r in reduced) for d in xm.dims)
    return ChannelMap(dims, xm.ids)


def _reduction(walk: "Walk", node: fx.Node) -> Any:
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return _reduce(walk, node, arg(node, 1, "dim"), arg(node, 2, "keepdim", False), name in ("sum", "mean"))


def _vector_norm(walk: "Walk", node: fx.Node) -> Any:
    """``linalg.vector_norm(x, ord, dim, keepdim)``, ``torch.norm`` / ``x.norm(p, dim, keepdim)``."""
    p = arg(node, 1, "ord" if node.target is torch.linalg.vector_norm else "p", 2)
    positive = p == "fro" or (isinstance(p, (int, float)) and p > 0)
    return _reduce(walk, node, arg(node, 2, "dim"), arg(node, 3, "keepdim", False), positive)


def _rescale_mean(rw: Rewrite, node: fx.Node) -> None:
    """A mean over channels whose removed members were zero: mean over the kept ones times
    kept / dense is the dense model's mean."""
    xm = rw.map_of(node.args[0])
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if name != "mean" or not isinstance(xm, ChannelMap) or rw.map_of(node) is not None:
        return
    kept = int(rw.kept(xm.ids).sum())
    if kept == xm.ids.size:
        return
    with rw.gm.graph.inserting_after(node):
        scaled = rw.gm.graph.call_function(operator.mul, (node, kept / xm.ids.size))
    scaled.meta = dict(node.meta)
    node.replace_all_uses_with(scaled, delete_user_cb=lambda u: u is not scaled)


def elementwise(name: str = "element-wise op") -> OpRule:
    """The rule of an op applied to every element on its own (a custom activation). Raises nothing."""
    return OpRule(name, Category.POINTWISE, _unary, per_channel=True)


UNARY = elementwise("element-wise")
SPATIAL = OpRule("spatial", Category.SPATIAL, _spatial, keeps_zero=always)
PAD = OpRule("pad", Category.SPATIAL, _spatial, keeps_zero=_pads_zero)
SOFTMAX_RULE = OpRule("softmax", Category.REDUCE, _softmax)
REDUCTION = OpRule("reduction", Category.REDUCE, _reduction, rewrite=_rescale_mean, keeps_zero=always)
VECTOR_NORM = OpRule("vector norm", Category.REDUCE, _vector_norm, keeps_zero=always)

register_all(UNARY_FUNCTIONS + tuple(sorted(UNARY_METHODS)) + UNARY_MODULES, UNARY)
register_all(SPATIAL_FUNCTIONS + SPATIAL_MODULES, SPATIAL)
register_all(PAD_FUNCTIONS + PAD_MODULES, PAD)
register_all(SOFTMAX[0] + SOFTMAX[1] + SOFTMAX[2], SOFTMAX_RULE)
register_all(REDUCTIONS[0] + REDUCTIONS[1], REDUCTION)
register_all((torch.linalg.vector_norm, torch.norm, "norm"), VECTOR_NORM)
