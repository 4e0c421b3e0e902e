"""Dead-branch removal: a consumer whose whole input is removed outputs a per-channel constant.

Follow that constant through per-channel ops (norms, activations) to the element-wise op
(a residual add, an SE multiply) where it meets a live tensor, and replace it there by a
constant buffer. Dead-code elimination then deletes the branch, producers included.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from fxprune import ops
from fxprune.ir import ChannelGraph, ChannelMap, ParamSlice
from fxprune.passes.verify import record_values

CONSTANT_ROOT = "fxprune_constants"


def _per_channel(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), ops.BATCHNORM_MODULES + ops.UNARY_MODULES)
    if node.op == "call_method":
        return node.target in ops.UNARY_METHODS
    return node.op == "call_function" and node.target in ops.UNARY_FUNCTIONS


def _is_elementwise(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in ops.ELEMENTWISE_FUNCTIONS) or (
        node.op == "call_method" and node.target in ops.ELEMENTWISE_METHODS)


def _meeting_point(gm: fx.GraphModule, start: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(last node of the constant chain, the element-wise op it feeds) or None."""
    node = start
    while len(node.users) == 1:
        (user,) = node.users
        if _is_elementwise(user):
            others = [a for a in user.args if isinstance(a, fx.Node) and a is not node]
            out = user.meta.get("fxprune_value")
            if others and any(getattr(o.meta.get("fxprune_value"), "shape", None) == out.shape for o in others):
                return node, user
            return None
        if not _per_channel(gm, user):
            return None
        node = user
    return None


def remove_dead_branches(gm: fx.GraphModule, cg: ChannelGraph, keep: dict[int, np.ndarray], report) -> None:
    """Replace the outputs of fully removed branches by constants; see the module docstring."""
    dead = {gid for gid, mask in keep.items() if not mask.any()}
    if not dead:
        return
    nodes = {n.name: n for n in gm.graph.nodes}
    plans = []
    for layer in cg.layers:
        g, _ = cg.units.lookup(layer.in_ids)
        if layer.node in nodes and len(g) and all(int(x) in dead for x in g):
            point = _meeting_point(gm, nodes[layer.node])
            if point is not None:
                plans.append(point)
    if not plans:
        return
    values = record_values(gm, {end.name for end, _ in plans})
    container = getattr(gm, CONSTANT_ROOT, None)
    if container is None:
        container = torch.nn.Module()
        gm.add_submodule(CONSTANT_ROOT, container)
    for end, user in plans:
        v = values[end.name]
        const = v.reshape(v.shape[0], v.shape[1], -1)[:1, :, :1]
        if not torch.allclose(v, const.reshape([1, v.shape[1]] + [1] * (v.dim() - 2)).expand_as(v), rtol=1e-6, atol=1e-7):
            continue
        name = f"c{len(list(container.buffers()))}"
        container.register_buffer(name, const.reshape([1, v.shape[1]] + [1] * (v.dim() - 2)).clone())
        with gm.graph.inserting_before(user):
            attr = gm.graph.get_attr(f"{CONSTANT_ROOT}.{name}")
        user.replace_input_with(end, attr)
        report.removed_branches.append(end.name)
        cmap = cg.node_maps.get(end.name)
        if isinstance(cmap, ChannelMap) and cmap.dims == (1,):
            cg.param_slices[(f"{CONSTANT_ROOT}.{name}", 1)] = ParamSlice(CONSTANT_ROOT, name, 1, cmap.ids.copy())
    gm.graph.eliminate_dead_code()
