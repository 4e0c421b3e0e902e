"""Normalization layers: per-channel statistics and affine parameters on the channel dim.

Batch and instance norms are per channel; a group norm's statistics span a norm group, so a
whole norm group is one unit (dropping it lowers ``num_groups``); a layer norm over the
channels changes every channel's statistics and blocks them. ``per_channel`` builds the rule a
user registers for a custom per-channel layer; ``norm_then_act`` the rule of a norm followed by
an activation inside one module (timm's norm-act layers, registered by name: timm stays optional).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxprune.ir import ChannelMap
from fxprune.rules.base import REGISTRY, Category, OpRule, Rewrite, arg, register_all, register_named

if TYPE_CHECKING:
    from fxprune.analysis import Walk

BATCHNORM_MODULES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
)


def _bind_all(walk: "Walk", node: fx.Node, xm: ChannelMap, qualnames: Sequence[str]) -> None:
    for q in qualnames:
        walk.bind(q, 0, xm.ids, f"norm '{node.name}'")


def _module_params(mod: nn.Module, path: str, names: Sequence[str]) -> list[str]:
    return [f"{path}.{n}" for n in names if getattr(mod, n, None) is not None]


def per_channel(params: Sequence[str] = ("weight", "bias"), buffers: Sequence[str] = (),
                affine: Sequence[str] | None = None, size_attr: str | None = None,
                name: str = "per-channel layer") -> OpRule:
    """The rule of a module that acts on each channel (dim 1) separately with vectors of one
    value per channel: ``params`` and ``buffers`` are sliced with the channels; ``affine`` (default:
    ``params``) are the ones that scale the output linearly, so a gate after the layer folds into
    them; ``size_attr`` (e.g. ``"num_features"``) is set to the kept channel count.
    Raises nothing itself; ``register_op`` checks the rule it is given."""
    fold = tuple(params if affine is None else affine)
    vectors = tuple(params) + tuple(buffers)

    def propagate(walk: "Walk", node: fx.Node) -> Any:
        xm = walk.channel_map(node, node.args[0])
        if xm is not None:
            _bind_all(walk, node, xm, _module_params(walk.module(node), node.target, vectors))
        return xm

    def gate_params(gm: fx.GraphModule, node: fx.Node) -> list[tuple[str, int]]:
        return [(q, 0) for q in _module_params(gm.get_submodule(node.target), node.target, fold)]

    def resize(mod: nn.Module) -> None:
        if size_attr is None:
            return
        ref = next((getattr(mod, n) for n in vectors if getattr(mod, n, None) is not None), None)
        if ref is not None:
            setattr(mod, size_attr, ref.shape[0])

    return OpRule(name, Category.NORM, propagate, gate_params=gate_params if fold else None,
                  resize=resize, per_channel=True)


def norm_then_act(norm: OpRule, name: str) -> OpRule:
    """The rule of a module that applies ``norm`` and then its ``drop`` and ``act`` submodules
    (timm's ``BatchNormAct2d`` family): channels move as through ``norm`` when both are
    parameter-free element-wise ops, else they are blocked. A gate after such a module cannot
    fold into the norm's affine parameters (the activation between is not linear), so it offers
    none: the producer before it is gated instead, and its gate folds into that producer."""

    def propagate(walk: "Walk", node: fx.Node) -> Any:
        mod = walk.module(node)
        for part in ("drop", "act"):
            sub = getattr(mod, part, None)
            rule = REGISTRY.module_rule(sub) if isinstance(sub, nn.Module) else None
            if sub is not None and (rule is None or rule.category is not Category.POINTWISE
                                    or any(True for _ in sub.parameters()) or any(True for _ in sub.buffers())):
                return walk.opaque(node, f"{name} '{node.target}': its {part} ({type(sub).__name__}) is not a "
                                         "parameter-free element-wise op with a rule (fxprune.register_op)")
        return norm.propagate(walk, node)

    return OpRule(name, Category.NORM, propagate, resize=norm.resize, per_channel=norm.per_channel)


def _batchnorm_function(walk: "Walk", node: fx.Node) -> Any:
    xm = walk.channel_map(node, node.args[0])
    if xm is None:
        return None
    stats = list(node.args[1:5]) + [node.kwargs.get(k) for k in ("running_mean", "running_var", "weight", "bias")]
    for a in stats:
        if isinstance(a, fx.Node):
            if a.op != "get_attr":
                return walk.opaque(node, "functional norm with computed statistics")
            walk.bind(a.target, 0, xm.ids, f"norm '{node.name}'")
    return xm


def _groupnorm(walk: "Walk", node: fx.Node) -> Any:
    xm = walk.channel_map(node, node.args[0])
    if xm is None:
        return None
    if node.op == "call_module":
        mod = walk.module(node)
        num_groups = mod.num_groups
        params = _module_params(mod, node.target, ("weight", "bias"))
    else:
        num_groups = arg(node, 1, "num_groups")
        params = [a.target for a in (arg(node, 2, "weight"), arg(node, 3, "bias")) if isinstance(a, fx.Node)]
    if not isinstance(num_groups, int):
        return walk.opaque(node, "group_norm with a computed number of groups")
    per = len(xm.ids) // num_groups
    blocks = xm.ids.reshape(num_groups, per)
    walk.couple(np.repeat(blocks[:, :1], per, axis=1), blocks, f"group_norm '{node.name}'")
    _bind_all(walk, node, xm, params)
    return xm


def dense_count_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                           dense: int) -> torch.Tensor:
    """LayerNorm over the last dim of ``x`` (the kept channels) with the statistics the dense
    layer computed when the removed channels were zero: mean = sum / n, var = (sum of
    (x - mean)^2 over the kept + (n - kept) * mean^2) / n, n = ``dense``."""
    mean = x.sum(-1, keepdim=True) / dense
    var = (((x - mean) ** 2).sum(-1, keepdim=True) + (dense - x.shape[-1]) * mean ** 2) / dense
    return (x - mean) * torch.rsqrt(var + eps) * weight + bias


class DenseCountLayerNorm(nn.LayerNorm):
    """A pruned ``nn.LayerNorm`` over the channels: ``dense_count_layer_norm`` with
    ``dense_features`` (what finalize makes of one, ``_resize_layernorm``)."""

    dense_features: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense_count_layer_norm(x, self.weight, self.bias, self.eps, self.dense_features)


def _layernorm_parts(node: fx.Node, mod: nn.Module | None) -> tuple[int, list[str]]:
    """How many trailing dims it normalizes and its affine parameters (qualified names; empty
    unless both weight and bias are stored tensors); ``mod``: the module of a ``call_module``."""
    if node.op == "call_module":
        params = _module_params(mod, node.target, ("weight", "bias"))
        return len(mod.normalized_shape), params if len(params) == 2 else []
    ns = arg(node, 1, "normalized_shape")
    affine = [arg(node, 2, "weight"), arg(node, 3, "bias")]
    params = [a.target for a in affine if isinstance(a, fx.Node) and a.op == "get_attr"]
    return (len(ns) if isinstance(ns, (tuple, list)) else 1), params if len(params) == 2 else []


def _layernorm(walk: "Walk", node: fx.Node) -> Any:
    """Over other dims the channels pass. Over the channels (the last dim alone), with stored
    weight and bias, it prunes exactly where the removed channels are zero at its input: its
    output is gated there too (the gate folds into weight and bias) and finalize gives it the
    dense statistics (``dense_count_layer_norm``). Anything else over the channels blocks them."""
    xm = walk.map(node.args[0])
    shape = walk.meta(node.args[0]).shape
    normalized, params = _layernorm_parts(node, walk.module(node) if node.op == "call_module" else None)
    if not set(xm.dims) & set(range(len(shape) - normalized, len(shape))):
        return xm
    where = f"layer_norm at '{node.name}'"
    if normalized != 1 or xm.dims != (len(shape) - 1,) or not params:
        walk.block(xm, f"{where} normalizes over the channels (their statistics would change)")
    elif not walk.removed_are_zero(node.args[0]):
        walk.block(xm, f"{where} normalizes over the channels, where removed channels are not known to be zero "
                       "(their statistics would change)")
    else:
        _bind_all(walk, node, xm, params)
        walk.add_site(node.name, len(shape) - 1, xm.ids)
    return xm


def _layernorm_gate_params(gm: fx.GraphModule, node: fx.Node) -> list[tuple[str, int]]:
    """Weight and bias fold the gate on the norm's own site (``_layernorm``)."""
    normalized, params = _layernorm_parts(node, gm.get_submodule(node.target) if node.op == "call_module" else None)
    return [(q, 0) for q in params] if normalized == 1 else []


def _resize_layernorm(mod: nn.Module) -> None:
    """A LayerNorm whose channels were sliced keeps the dense count in its statistics."""
    if mod.weight is None or len(mod.normalized_shape) != 1 or mod.weight.shape[0] == mod.normalized_shape[0]:
        return
    dense = getattr(mod, "dense_features", mod.normalized_shape[0])
    mod.__class__ = DenseCountLayerNorm
    mod.dense_features, mod.normalized_shape = dense, (mod.weight.shape[0],)


def _rewrite_layernorm(rw: Rewrite, node: fx.Node) -> None:
    """``F.layer_norm`` over pruned channels becomes ``dense_count_layer_norm`` (its literal
    ``normalized_shape`` would no longer fit)."""
    xm = rw.map_of(node.args[0])
    if node.op != "call_function" or not isinstance(xm, ChannelMap) or len(xm.dims) != 1 \
            or xm.dims[0] != len(node.args[0].meta["fxprune_value"].shape) - 1 or rw.kept(xm.ids).all():
        return
    node.target = dense_count_layer_norm
    node.args = (node.args[0], arg(node, 2, "weight"), arg(node, 3, "bias"), arg(node, 4, "eps", 1e-5), xm.ids.size)
    node.kwargs = {}


def _prelu(walk: "Walk", node: fx.Node) -> Any:
    xm = walk.channel_map(node, node.args[0])
    if xm is not None and walk.module(node).num_parameters > 1:
        walk.bind(f"{node.target}.weight", 0, xm.ids, f"prelu '{node.name}'")
    return xm


def _resize_groupnorm(mod: nn.Module) -> None:
    if mod.weight is not None:
        per = mod.num_channels // mod.num_groups
        mod.num_channels = mod.weight.shape[0]
        mod.num_groups = mod.num_channels // per


def _resize_prelu(mod: nn.Module) -> None:
    mod.num_parameters = mod.weight.shape[0]


def _groupnorm_gate_params(gm: fx.GraphModule, node: fx.Node) -> list[tuple[str, int]]:
    if node.op != "call_module":
        return []
    return [(q, 0) for q in _module_params(gm.get_submodule(node.target), node.target, ("weight", "bias"))]


BATCHNORM = per_channel(params=("weight", "bias"), buffers=("running_mean", "running_var"),
                        size_attr="num_features", name="batch_norm")
BATCHNORM_FUNCTION = OpRule("batch_norm (functional)", Category.NORM, _batchnorm_function, per_channel=True)
GROUPNORM = OpRule("group_norm", Category.NORM, _groupnorm, gate_params=_groupnorm_gate_params,
                   resize=_resize_groupnorm)
LAYERNORM = OpRule("layer_norm", Category.NORM, _layernorm, gate_params=_layernorm_gate_params,
                   resize=_resize_layernorm, rewrite=_rewrite_layernorm)
PRELU = OpRule("prelu", Category.POINTWISE, _prelu, resize=_resize_prelu, per_channel=True)

register_all(BATCHNORM_MODULES, BATCHNORM)
register_all((F.batch_norm, F.instance_norm), BATCHNORM_FUNCTION)
register_all((nn.GroupNorm, F.group_norm), GROUPNORM)
register_all((nn.LayerNorm, F.layer_norm), LAYERNORM)
register_all((nn.PReLU,), PRELU)

# timm's norm-act layers, by name: timm stays optional. LayerNormAct* and RmsNormAct* normalize
# over the channels: they get no rule, are traced into, and their norm blocks the channels.
_TIMM = "timm.layers.norm_act."
BATCHNORM_ACT = norm_then_act(BATCHNORM, "batch_norm + act")
FROZEN_BATCHNORM_ACT = norm_then_act(per_channel(params=(), buffers=("weight", "bias", "running_mean", "running_var")),
                                     "frozen batch_norm + act")
GROUPNORM_ACT = norm_then_act(GROUPNORM, "group_norm + act")
for _name, _rule in (("BatchNormAct2d", BATCHNORM_ACT), ("SyncBatchNormAct", BATCHNORM_ACT),
                     ("FrozenBatchNormAct2d", FROZEN_BATCHNORM_ACT), ("GroupNormAct", GROUPNORM_ACT),
                     ("GroupNorm1Act", GROUPNORM_ACT)):
    register_named(_TIMM + _name, _rule)
