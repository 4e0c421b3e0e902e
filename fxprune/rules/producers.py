"""Producers: convolutions and linear layers create new channel spaces and consume their inputs'.

A grouped conv keeps its group width: a whole conv group (its inputs and outputs) is one unit,
and dropping units lowers ``groups``. Grouped transposed convs are blocked.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxprune.ir import ChannelMap, Layer
from fxprune.rules.base import Category, OpRule, Rewrite, arg, register_all

if TYPE_CHECKING:
    from fxprune.analysis import Walk

CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
CONV_FUNCTIONS = (F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d)


def _conv(walk: "Walk", node: fx.Node, x: fx.Node, weight: str, bias: str | None, groups: int,
          transposed: bool, module_path: str | None, zero_padding: bool) -> ChannelMap | None:
    w_shape = walk.param_shape(node, weight)
    if w_shape is None:
        return walk.opaque(node, f"conv whose weight '{weight}' is computed (a parametrization?), not stored")
    in_ids = walk.input_ids(node, x, 1)
    out_shape = walk.meta(node).shape
    out_ids = walk.fresh(out_shape[1], node)
    where = f"conv '{node.name}'"
    if groups == 1:
        walk.bind(weight, 0 if transposed else 1, in_ids, where)
        walk.bind(weight, 1 if transposed else 0, out_ids, where)
    elif transposed:
        walk.block(ChannelMap((1,), in_ids), f"grouped transposed conv '{node.name}'")
        walk.block(ChannelMap((1,), out_ids), f"grouped transposed conv '{node.name}'")
    else:
        blocks = np.concatenate([in_ids.reshape(groups, -1), out_ids.reshape(groups, -1)], axis=1)
        first_out = blocks[:, -out_ids.size // groups:][:, :1]
        walk.couple(np.repeat(first_out, blocks.shape[1], axis=1), blocks, where)
        walk.bind(weight, 0, out_ids, where)
    if bias is not None:
        walk.bind(bias, 0, out_ids, where)
    spatial = int(np.prod(walk.meta(x).shape[2:] if transposed else out_shape[2:]))
    walk.add_layer(Layer(
        node=node.name, kind="conv_transpose" if transposed else "conv", module_path=module_path,
        weight=weight, bias=bias, in_ids=in_ids, out_ids=out_ids, groups=groups,
        in_per_group=len(in_ids) // groups, macs_per_pair=spatial * int(np.prod(w_shape[2:])),
        zero_padding=zero_padding,
    ))
    walk.add_site(node.name, 1, out_ids)
    return ChannelMap((1,), out_ids)


def _zero_padding(padding: Any) -> bool:
    if isinstance(padding, str):
        return padding == "valid"
    pads = padding if isinstance(padding, (tuple, list)) else (padding,)
    return all(p == 0 for p in pads)


def _conv_module(walk: "Walk", node: fx.Node) -> ChannelMap | None:
    mod = walk.module(node)
    bias = f"{node.target}.bias" if mod.bias is not None else None
    return _conv(walk, node, node.args[0], f"{node.target}.weight", bias, mod.groups,
                 isinstance(mod, CONV_TRANSPOSE_MODULES), node.target, _zero_padding(mod.padding))


def _stored(value: Any) -> bool:
    return value is None or (isinstance(value, fx.Node) and value.op == "get_attr")


def _conv_function(walk: "Walk", node: fx.Node) -> ChannelMap | None:
    w, b, groups = arg(node, 1, "weight"), arg(node, 2, "bias"), arg(node, 6, "groups", 1)
    if w is None or not _stored(w) or not _stored(b) or not isinstance(groups, int):
        return walk.opaque(node, "functional conv whose weight is not a parameter of the model")
    return _conv(walk, node, node.args[0], w.target, b.target if b is not None else None, groups,
                 False, None, _zero_padding(arg(node, 4, "padding", 0)))


def _linear(walk: "Walk", node: fx.Node, x: fx.Node, weight: str, bias: str | None,
            module_path: str | None) -> ChannelMap | None:
    if walk.param_shape(node, weight) is None:
        return walk.opaque(node, f"linear whose weight '{weight}' is computed (a parametrization?), not stored")
    last = len(walk.meta(x).shape) - 1
    in_ids = walk.input_ids(node, x, last)
    out_shape = walk.meta(node).shape
    out_ids = walk.fresh(out_shape[-1], node)
    where = f"linear '{node.name}'"
    walk.bind(weight, 1, in_ids, where)
    walk.bind(weight, 0, out_ids, where)
    if bias is not None:
        walk.bind(bias, 0, out_ids, where)
    walk.add_layer(Layer(
        node=node.name, kind="linear", module_path=module_path, weight=weight, bias=bias,
        in_ids=in_ids, out_ids=out_ids, groups=1, in_per_group=len(in_ids),
        macs_per_pair=int(np.prod(out_shape[1:-1])), zero_padding=True,
    ))
    walk.add_site(node.name, len(out_shape) - 1, out_ids)
    return ChannelMap((len(out_shape) - 1,), out_ids)


def _linear_module(walk: "Walk", node: fx.Node) -> ChannelMap | None:
    mod = walk.module(node)
    bias = f"{node.target}.bias" if mod.bias is not None else None
    return _linear(walk, node, node.args[0], f"{node.target}.weight", bias, node.target)


def _linear_function(walk: "Walk", node: fx.Node) -> ChannelMap | None:
    w, b = arg(node, 1, "weight"), arg(node, 2, "bias")
    if w is None or not _stored(w) or not _stored(b):
        return walk.opaque(node, "functional linear whose weight is not a parameter of the model")
    return _linear(walk, node, node.args[0], w.target, b.target if b is not None else None, None)


# ---- finalize ------------------------------------------------------------------------------------
def _module_gate_params(out_dim: int):
    def params(gm: fx.GraphModule, node: fx.Node) -> list[tuple[str, int]]:
        mod = gm.get_submodule(node.target)
        out = [(f"{node.target}.weight", out_dim)]
        return out + ([(f"{node.target}.bias", 0)] if mod.bias is not None else [])
    return params


def _functional_gate_params(gm: fx.GraphModule, node: fx.Node) -> list[tuple[str, int]]:
    return [(a.target, 0) for a in (arg(node, 1, "weight"), arg(node, 2, "bias")) if isinstance(a, fx.Node)]


def _resize_conv(mod: nn.Module) -> None:
    w = mod.weight
    if mod.transposed:
        per_in = mod.in_channels // mod.groups
        mod.in_channels = w.shape[0]
        mod.groups = max(1, w.shape[0] // per_in) if mod.groups > 1 else 1
        mod.out_channels = w.shape[1] * mod.groups
    else:
        per_out = mod.out_channels // mod.groups
        mod.out_channels = w.shape[0]
        mod.groups = w.shape[0] // per_out if mod.groups > 1 else 1
        mod.in_channels = w.shape[1] * mod.groups


def _resize_linear(mod: nn.Module) -> None:
    mod.out_features, mod.in_features = mod.weight.shape


def _rewrite_functional_groups(rw: Rewrite, node: fx.Node) -> None:
    """``F.conv2d(..., groups=g)`` with a literal g: lower it with the kept conv groups."""
    groups = arg(node, 6, "groups", 1)
    weight = arg(node, 1, "weight")
    if not isinstance(groups, int) or groups == 1 or not isinstance(weight, fx.Node) or weight.op != "get_attr":
        return  # a computed weight made the conv opaque: its channels, and so its groups, stay
    path, _, name = weight.target.rpartition(".")
    kept_out = getattr(rw.gm.get_submodule(path), name).shape[0]
    new = kept_out // (node.meta["fxprune_value"].shape[1] // groups)
    if len(node.args) > 6:
        node.args = node.args[:6] + (new,) + node.args[7:]
    else:
        node.kwargs = {**node.kwargs, "groups": new}


CONV = OpRule("conv", Category.PRODUCER, _conv_module, gate_params=_module_gate_params(0), resize=_resize_conv)
CONV_TRANSPOSE = OpRule("conv_transpose", Category.PRODUCER, _conv_module,
                        gate_params=_module_gate_params(1), resize=_resize_conv)
CONV_FUNCTION = OpRule("conv (functional)", Category.PRODUCER, _conv_function,
                       gate_params=_functional_gate_params, rewrite=_rewrite_functional_groups)
LINEAR = OpRule("linear", Category.PRODUCER, _linear_module, gate_params=_module_gate_params(0),
                resize=_resize_linear)
LINEAR_FUNCTION = OpRule("linear (functional)", Category.PRODUCER, _linear_function,
                         gate_params=_functional_gate_params)

register_all(CONV_MODULES, CONV)
register_all(CONV_TRANSPOSE_MODULES, CONV_TRANSPOSE)
register_all(CONV_FUNCTIONS, CONV_FUNCTION)
register_all((nn.Linear,), LINEAR)
register_all((F.linear,), LINEAR_FUNCTION)
