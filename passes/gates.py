"""insert_gates: put one gate vector per prunable channel group into a copy of the graph.

A gate sits where the group's channels are *produced*: on the output of each producer conv or
linear, or right after the affine BatchNorm that is that producer's only user. A gate there
scales whole channels. Zeroing it therefore makes the channel exactly zero downstream (up to
later per-channel ops), and any gate value folds exactly into the producer's parameters
(g * (W x + b) = (g W) x + g b, and g * BN(z) = BN with gamma, beta scaled by g), also for
groups with several producers (residual streams).
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn

from fxprune.ir import ChannelGraph, ChannelGroup
from fxprune.ops import BATCHNORM_MODULES

GATE_ROOT = "fxprune_gates"


class Gate(nn.Module):
    """One gate value per unit of a channel group; methods subclass it to transform ``weight``."""

    def __init__(self, size: int, group_id: int, init: float = 1.0):
        super().__init__()
        self.group_id = group_id
        self.weight = nn.Parameter(torch.full((size,), float(init)))

    def values(self) -> torch.Tensor:
        """The multiplier per unit (methods override this: GDP's smoothed L0, DAIS's sigmoid, ...)."""
        return self.weight

    def forward(self, x: torch.Tensor, index: torch.Tensor | None = None, dim: int = 1) -> torch.Tensor:
        v = self.values()
        if index is not None:
            v = v[index]
        shape = [1] * x.dim()
        shape[dim] = -1
        return x * v.view(shape).to(x.dtype)


GateFactory = Callable[[ChannelGroup], Gate]


def _anchor(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """The node whose output is gated: the producer, or its sole affine BatchNorm user."""
    modules = dict(gm.named_modules())
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_module":
        mod = modules[users[0].target]
        if isinstance(mod, BATCHNORM_MODULES) and getattr(mod, "weight", None) is not None and users[0].args[0] is node:
            return users[0]
    return node


def gate_sites(gm: fx.GraphModule) -> list[fx.Node]:
    """The gate nodes of a gated module."""
    return [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith(GATE_ROOT + ".")]


def insert_gates(
    gm: fx.GraphModule,
    channel_graph: ChannelGraph,
    gate_factory: GateFactory | None = None,
    groups: list[int] | None = None,
) -> tuple[fx.GraphModule, dict[int, Gate]]:
    """Return a gated copy of ``gm`` and ``{group id: gate}`` for every prunable group.

    ``groups`` restricts gating to those group ids; ``gate_factory`` builds each group's gate
    (default: ``Gate`` initialised to 1, which leaves the model's function unchanged).
    """
    factory = gate_factory or (lambda g: Gate(g.size, g.id))
    gated = copy.deepcopy(gm)
    container = nn.Module()
    gated.add_submodule(GATE_ROOT, container)
    nodes = {n.name: n for n in gated.graph.nodes}
    gates: dict[int, Gate] = {}
    for group in channel_graph.prunable_groups:
        if groups is not None and group.id not in groups:
            continue
        gate = factory(group)
        container.add_module(f"g{group.id}", gate)
        gates[group.id] = gate
        for k, site in enumerate(group.sites):
            anchor = _anchor(gated, nodes[site.node])
            identity = len(site.units) == group.size and bool((site.units == range(group.size)).all())
            with gated.graph.inserting_after(anchor):
                index = None
                if not identity:
                    gate.register_buffer(f"site{k}", torch.as_tensor(site.units, dtype=torch.long))
                    index = gated.graph.get_attr(f"{GATE_ROOT}.g{group.id}.site{k}")
                with gated.graph.inserting_after(index or anchor):
                    gate_node = gated.graph.call_module(f"{GATE_ROOT}.g{group.id}", (anchor, index, site.dim))
            anchor.replace_all_uses_with(gate_node, delete_user_cb=lambda u: u is not gate_node)
            gate_node.meta["fxprune_group"] = group.id
    gated.recompile()
    return gated, gates
