"""Dead-branch removal: a consumer whose whole input is removed outputs a per-channel constant.

Follow that constant through per-channel ops (rules with ``per_channel``: norms, activations) to
the element-wise op (a residual add, an SE multiply) where it meets a live tensor, and replace it
there by a constant buffer. Dead-code elimination then deletes the branch, producers included.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from fxprune.ir import ChannelGraph, ChannelMap, ParamSlice
from fxprune.rules import Category, rule_for

CONSTANT_ROOT = "fxprune_constants"


def _meeting_point(node: fx.Node, modules: dict) -> tuple[fx.Node, fx.Node] | None:
    """(last node of the constant chain, the element-wise op it feeds) or None."""
    while len(node.users) == 1:
        (user,) = node.users
        rule = rule_for(user, modules)
        if rule is not None and rule.category is Category.COUPLE:
            others = [a for a in user.args if isinstance(a, fx.Node) and a is not node]
            out = user.meta.get("fxprune_value")
            if others and any(getattr(o.meta.get("fxprune_value"), "shape", None) == out.shape for o in others):
                return node, user
            return None
        if rule is None or not rule.per_channel:
            return None
        node = user
    return None


def dead_branch_plans(gm: fx.GraphModule, cg: ChannelGraph, keep: dict[int, np.ndarray]) -> list[tuple[fx.Node, fx.Node]]:
    """Where fully removed branches meet live tensors: (end of the dead chain, element-wise op)."""
    dead = {gid for gid, mask in keep.items() if not mask.any()}
    if not dead:
        return []
    nodes = {n.name: n for n in gm.graph.nodes}
    modules = dict(gm.named_modules())
    plans = []
    for layer in cg.layers:
        g, _ = cg.units.lookup(layer.in_ids)
        if layer.node in nodes and len(g) and all(int(x) in dead for x in g):
            point = _meeting_point(nodes[layer.node], modules)
            if point is not None:
                plans.append(point)
    return plans


def remove_dead_branches(gm: fx.GraphModule, cg: ChannelGraph, plans: list[tuple[fx.Node, fx.Node]],
                         values: dict[str, torch.Tensor], report) -> dict[tuple[str, int], ParamSlice]:
    """Replace each planned chain end by its constant (from ``values``, recorded in eval mode).

    Returns the slices of the new constant buffers along the channel dim, for finalize to slice.
    """
    if not plans:
        return {}
    container = getattr(gm, CONSTANT_ROOT, None)
    if container is None:
        container = torch.nn.Module()
        gm.add_submodule(CONSTANT_ROOT, container)
    slices: dict[tuple[str, int], ParamSlice] = {}
    for end, user in plans:
        v = values[end.name]
        shape = [1, v.shape[1]] + [1] * (v.dim() - 2)
        const = v.reshape(v.shape[0], v.shape[1], -1)[:1, :, :1].reshape(shape)
        if not torch.allclose(v, const.expand_as(v), rtol=1e-6, atol=1e-7):
            continue
        name = f"c{len(list(container.buffers()))}"
        container.register_buffer(name, const.clone())
        with gm.graph.inserting_before(user):
            attr = gm.graph.get_attr(f"{CONSTANT_ROOT}.{name}")
        user.replace_input_with(end, attr)
        report.removed_branches.append(end.name)
        cmap = cg.node_maps.get(end.name)
        if isinstance(cmap, ChannelMap) and cmap.dims == (1,):
            slices[(f"{CONSTANT_ROOT}.{name}", 1)] = ParamSlice(CONSTANT_ROOT, name, 1, cmap.ids.copy())
    eliminate_dead_code(gm)
    return slices


def eliminate_dead_code(gm: fx.GraphModule) -> None:
    """fx's dead-code elimination without its two extra costs: fx asks ``Node.is_impure`` about
    every node first (a module lookup per call_module) though only unused nodes can go, and lints
    the whole graph (together about a tenth of a forward on mobilenet_v2). The passes keep the
    graph topologically ordered (each inserts next to what it reads), which the lint checks for;
    submodules' own graphs (a leaf that is a GraphModule) are not touched."""
    for node in reversed(gm.graph.nodes):  # users first: their inputs then lose a use
        if not node.users and not node.is_impure():
            gm.graph.erase_node(node)
