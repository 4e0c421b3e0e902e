"""insert_gates: put one gate vector per prunable channel group into a copy of the graph.

A gate sits where the group's channels are *produced*: on the output of each producer conv or
linear, or right after the affine BatchNorm that is that producer's only user. A gate there
scales whole channels. Zeroing it therefore makes the channel exactly zero downstream (up to
later per-channel ops), and any gate value folds exactly into the producer's parameters
(g * (W x + b) = (g W) x + g b, and g * BN(z) = BN with gamma, beta scaled by g), also for
groups with several producers (residual streams).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn

from fxprune.decision import Decision
from fxprune.errors import ConfigError
from fxprune.gcpause import gc_paused
from fxprune.ir import ChannelGraph, ChannelGroup
from fxprune.rules.base import gate_anchor
from fxprune.passes.sharing import get_tensor, materialize, replace_tensor, structural_copy

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


def is_gate(node: fx.Node) -> bool:
    """Whether ``node`` calls one of the gates ``insert_gates`` put in."""
    return node.op == "call_module" and str(node.target).startswith(GATE_ROOT + ".")


def gate_sites(gm: fx.GraphModule) -> list[fx.Node]:
    """The gate nodes of a gated module."""
    return [n for n in gm.graph.nodes if is_gate(n)]


def gate_free_copy(gated: fx.GraphModule) -> fx.GraphModule:
    """A working copy of ``gated`` (``structural_copy``: not yet materialized) without its gates:
    its graph is made without the gate nodes and the nodes reading their unit indices, so each
    gate's user reads the gated node, and the gate modules are dropped."""
    sites = gate_sites(gated)
    plain = structural_copy(gated, bypass={*sites, *(n.args[1] for n in sites if n.args[1] is not None)})
    if hasattr(plain, GATE_ROOT):
        delattr(plain, GATE_ROOT)
    return plain


@gc_paused
def insert_gates(
    gm: fx.GraphModule,
    channel_graph: ChannelGraph,
    gate_factory: GateFactory | None = None,
    groups: list[int] | None = None,
) -> tuple[fx.GraphModule, dict[int, Gate]]:
    """Return a gated copy of ``gm`` and ``{group id: gate}`` for every prunable group.

    ``groups`` restricts gating to those group ids; ``gate_factory`` builds each group's gate
    (default: ``Gate`` initialised to 1, which leaves the model's function unchanged). The gated
    copy shares ``gm``'s parameters and buffers (gates only add modules): training it trains
    them. Raises ``AnalysisError`` if ``channel_graph`` was not computed from ``gm``.
    """
    factory = gate_factory or (lambda g: Gate(g.size, g.id))
    gated = structural_copy(gm)
    container = nn.Module()
    gated.add_submodule(GATE_ROOT, container)
    channel_graph.check_source(gm, "insert_gates")
    nodes = {n.name: n for n in gated.graph.nodes}
    modules = dict(gated.named_modules())
    gates: dict[int, Gate] = {}
    for group in channel_graph.prunable_groups:
        if groups is not None and group.id not in groups:
            continue
        gate = factory(group)
        container.add_module(f"g{group.id}", gate)
        gates[group.id] = gate
        for k, site in enumerate(group.sites):
            anchor = gate_anchor(gated, nodes[site.node], modules)
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
    return gated, gates  # gates only add modules: nothing to drop, and the code is written when first run


def read_gates(gated: fx.GraphModule, channel_graph: ChannelGraph) -> Decision:
    """The decision a gated module holds: units whose gate value is exactly 0 are removed, the
    others keep their gate value as a scale to fold. Raises ``ConfigError`` when a gate does not
    fit its group in ``channel_graph`` (a graph from another module)."""
    scale: dict[int, torch.Tensor] = {}
    for node in gate_sites(gated):
        gate = gated.get_submodule(node.target)
        scale[gate.group_id] = gate.values().detach().float()
    keep = {gid: (v != 0).numpy() for gid, v in scale.items()}
    return Decision(channel_graph.keep_masks(keep), scale)


def strip_gates(gated: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gated`` without its gates (sharing its parameters): the traced model again.
    Raises nothing of its own; a module without gates comes back as a copy."""
    return materialize(gate_free_copy(gated))


def apply_decision(module: fx.GraphModule, channel_graph: ChannelGraph, decision: Decision) -> fx.GraphModule:
    """A gated copy of ``module`` (its own gates stripped) that computes what ``decision`` means:
    every gate holds the decision's scale where a unit is kept and 0 where it is removed, and
    masked weights hold exact zeros. Finalize checks the pruned module against this one.
    Raises ``AnalysisError`` for a channel graph of another module (``insert_gates``) and
    ``ConfigError`` for a weight mask that names no tensor of ``module``."""
    plain = strip_gates(module) if gate_sites(module) else module
    gated, gates = insert_gates(plain, channel_graph)
    with torch.no_grad():
        for gid, gate in gates.items():
            gate.weight.copy_(decision.gate_values(gid, gate.weight.numel()))
    for qualname, mask in decision.weight_masks.items():
        try:
            old = get_tensor(gated, qualname).detach()
        except AttributeError:
            raise ConfigError(f"Decision weight mask {qualname!r} names no parameter of the module; use names from "
                              "module.named_parameters()") from None
        if tuple(mask.shape) != tuple(old.shape):
            raise ConfigError(f"Decision weight mask {qualname!r} has shape {tuple(mask.shape)}, the parameter "
                              f"{tuple(old.shape)}")
        replace_tensor(gated, qualname, old * mask.to(old.dtype))
    return gated
