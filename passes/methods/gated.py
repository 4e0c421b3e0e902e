"""Shared machinery of methods that learn their decision through gates (GDP, DSA, DAIS, W-Gates):
gates inserted at the groups' producers, trained in their own optimizer group, read back as a
Decision (exact zeros are removed units; the other values are folded)."""
from __future__ import annotations

import numpy as np
import torch

from fxprune.decision import Decision
from fxprune.ir import ChannelGroup
from fxprune.method import Context, Method
from fxprune.passes.gates import Gate, insert_gates, read_gates


class GateMethod(Method):
    """A method whose ``prepare`` inserts one gate per prunable group (``make_gate``)."""

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.gates: dict[int, Gate] = {}

    def make_gate(self, group: ChannelGroup) -> Gate:
        return Gate(group.size, group.id)

    def prepare(self, ctx: Context) -> None:
        ctx.module, self.gates = insert_gates(ctx.traced, ctx.graph, gate_factory=self.make_gate)

    def parameters(self, ctx: Context) -> list[torch.nn.Parameter]:
        return [g.weight for g in self.gates.values() if g.weight.requires_grad]

    def gate_decision(self, ctx: Context) -> Decision:
        return read_gates(ctx.module, ctx.graph)


def round_down(keep: dict[int, np.ndarray], values: dict[int, np.ndarray], r: int) -> dict[int, np.ndarray]:
    """Honour ``round_to=r``: drop each pruned group's lowest-valued survivors down to a multiple
    of r. Removing units only lowers every cost, so a met budget stays met; a group with fewer
    than r survivors keeps them all (a removed unit is not revived), and untouched groups keep
    their width."""
    if r == 1:
        return keep
    for gid, mask in keep.items():
        alive = np.nonzero(mask)[0]
        if len(alive) == len(mask) or len(alive) < r:
            continue
        extra = len(alive) % r
        if extra:
            mask[alive[np.argsort(values[gid][alive], kind="stable")[:extra]]] = False
    return keep
