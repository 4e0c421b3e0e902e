"""The method interface: prepare -> (loss, step)* -> decide, over the shared channel graph."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx as fx

from fxprune.budget import Targets
from fxprune.cost import CostModel
from fxprune.ir import ChannelGraph
from fxprune.passes.gates import Gate, insert_gates


class Method:
    """A pruning method. Subclasses set ``name`` and override the hooks they need.

    ``prepare`` returns the gated module; ``loss`` is the extra training loss of one step;
    ``step`` runs the schedules after an optimizer step; ``decide`` writes the final decision into
    the gates (exact zeros for removed units) and returns the keep masks.
    """

    name = "method"
    needs_training = False

    def __init__(self) -> None:
        self.gm: fx.GraphModule | None = None
        self.cg: ChannelGraph | None = None
        self.cost: CostModel | None = None
        self.targets: Targets | None = None
        self.gates: dict[int, Gate] = {}
        self.steps = 0

    def make_gate(self, group) -> Gate:
        gate = Gate(group.size, group.id)
        gate.weight.requires_grad_(False)
        return gate

    def prepare(self, gm: fx.GraphModule, cg: ChannelGraph, cost: CostModel, targets: Targets) -> fx.GraphModule:
        self.gm, self.cg, self.cost, self.targets = gm, cg, cost, targets
        gated, self.gates = insert_gates(gm, cg, gate_factory=self.make_gate)
        self.gated = gated
        return gated

    def loss(self) -> torch.Tensor | None:
        return None

    def step(self) -> None:
        self.steps += 1

    def decide(self) -> dict[int, np.ndarray]:
        raise NotImplementedError

    def apply_keep(self, keep: dict[int, np.ndarray]) -> None:
        """Zero the gates of removed units (their surviving values stay and are folded)."""
        with torch.no_grad():
            for gid, gate in self.gates.items():
                self.zero_units(gate, torch.as_tensor(~keep[gid]))

    def zero_units(self, gate: Gate, removed: torch.Tensor) -> None:
        gate.weight[removed] = 0.0

    def gate_parameters(self) -> list[torch.nn.Parameter]:
        return [g.weight for g in self.gates.values() if g.weight.requires_grad]

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])

    def describe(self) -> dict[str, Any]:
        """Hyper-parameters, for the report."""
        return {}
