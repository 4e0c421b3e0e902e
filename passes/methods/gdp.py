"""GDP: Gates with Differentiable Polarization (Guo et al., ICCV 2021), see METHODS.md §1.

Per unit a trainable scalar x and the smoothed-L0 gate g = x^2 / (x^2 + eps): g(0) = 0 exactly
and dg/dx = 0 there, so a gate that reaches 0 stays there. Training minimises
task loss + lam * FLOPs(g) / FLOPs(dense), FLOPs bilinear in the gates through the cost model.

Choices that are this library's [A], because the paper leaves them open:
- placement: one gate per channel group at the group's producers (after their BatchNorm),
  shared by all of them; gates there fold exactly into the producers;
- ``lam`` adapts multiplicatively: it grows by ``lam_rate`` per step while the *hard* FLOPs
  (every non-zero gate counted as kept) exceed the budget, and shrinks by it otherwise;
- ``eps`` anneals geometrically from ``eps_start`` to ``eps_end`` over the training steps;
- a gate whose value falls below ``snap`` is set to exactly 0 and held there (momentum could
  otherwise carry it off 0); this is how gates reach the exact zeros the paper prunes;
- if training ends above budget, the smallest gates are zeroed until it is met (``allocate``).
Surviving gate values are folded into the producers, so the finalized model equals the gated
model with no fine-tuning.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fxprune.budget import allocate
from fxprune.passes.gates import Gate
from fxprune.passes.methods.base import Method


class GDPGate(Gate):
    """g = alive * x^2 / (x^2 + eps), one x per unit."""

    def __init__(self, size: int, group_id: int, eps: float, init: float):
        super().__init__(size, group_id, init)
        self.register_buffer("eps", torch.tensor(float(eps)))
        self.register_buffer("alive", torch.ones(size))

    def values(self) -> torch.Tensor:
        x2 = self.weight * self.weight
        return self.alive * x2 / (x2 + self.eps)


class GDP(Method):
    """Gates with Differentiable Polarization; hyper-parameters documented in the module docstring."""

    name = "gdp"
    needs_training = True

    def __init__(self, lam: float = 1.0, lam_rate: float = 0.1, eps_start: float = 1.0,
                 eps_end: float = 1e-3, snap: float = 0.05, init: float = 1.0,
                 total_steps: int | None = None) -> None:
        super().__init__()
        self.lam, self.lam_rate = lam, lam_rate
        self.eps_start, self.eps_end, self.snap, self.init = eps_start, eps_end, snap, init
        self.total_steps = total_steps
        self._dense_macs = 1.0

    def make_gate(self, group) -> Gate:
        return GDPGate(group.size, group.id, self.eps_start, self.init)

    def prepare(self, gm, cg, cost, targets):
        gated = super().prepare(gm, cg, cost, targets)
        self._dense_macs = float(targets.dense_macs)
        return gated

    def soft_keep(self) -> dict[int, torch.Tensor]:
        return {gid: gate.values() for gid, gate in self.gates.items()}

    def hard_keep(self) -> dict[int, np.ndarray]:
        return {gid: (gate.values() > 0).detach().numpy() for gid, gate in self.gates.items()}

    def loss(self) -> torch.Tensor:
        return self.lam * self.cost.macs(self.soft_keep()) / self._dense_macs

    def step(self) -> None:
        super().step()
        with torch.no_grad():
            for gate in self.gates.values():
                gate.alive[gate.values() < self.snap] = 0.0
                gate.weight[gate.alive == 0] = 0.0
            above = not self.targets.met(self.cost, self.hard_keep())
            self.lam *= (1 + self.lam_rate) if above else (1 - self.lam_rate)
            if self.total_steps:
                t = min(self.steps / self.total_steps, 1.0)
                eps = self.eps_start * (self.eps_end / self.eps_start) ** t
                for gate in self.gates.values():
                    gate.eps.fill_(eps)

    def zero_units(self, gate: Gate, removed: torch.Tensor) -> None:
        gate.alive[removed] = 0.0
        gate.weight[removed] = 0.0

    def decide(self) -> dict[int, np.ndarray]:
        keep = self.hard_keep()
        for mask in keep.values():  # count a dead group as one channel: its branch may stay
            if not mask.any():
                mask[0] = True
        if not self.targets.met(self.cost, keep):
            # Training stopped above budget: rank the surviving gates; dead ones rank lowest.
            scores = {gid: gate.values().detach().double().numpy() for gid, gate in self.gates.items()}
            keep = allocate(self.cost, self.targets, scores)
        self.apply_keep(keep)
        return keep

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "lam": self.lam}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.lam = float(state["lam"])

    def describe(self) -> dict[str, Any]:
        return {"lam": self.lam, "lam_rate": self.lam_rate, "eps_start": self.eps_start,
                "eps_end": self.eps_end, "snap": self.snap, "init": self.init}
