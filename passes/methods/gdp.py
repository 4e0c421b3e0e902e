"""GDP: Gates with Differentiable Polarization (Guo et al., ICCV 2021), see METHODS.md §1.

Per unit a trainable scalar x and the smoothed-L0 gate g = x^2 / (x^2 + eps): g(0) = 0 exactly
and dg/dx = 0 there, so a gate that reaches 0 stays there. Training minimises
task loss + lam * FLOPs(g) / FLOPs(dense), FLOPs bilinear in the gates through the cost model.

Choices that are this library's [A], because the paper leaves them open:
- placement: one gate per channel group at the group's producers (after their BatchNorm),
  shared by all of them; gates there fold exactly into the producers;
- three phases over ``total_steps`` (required): warm-up, search, polarize. In the search
  ``lam`` grows by the factor ``1 + lam_rate`` per 1% of training while the *hard* FLOPs (every
  non-zero gate counted as kept) exceed the budget; once they meet it (permanently: zeroed
  gates stay zero) ``lam`` shrinks at the same rate and ``eps`` starts to anneal;
- for the first ``warmup`` fraction of the steps the penalty is off and ``lam`` is held: the
  network and the gates first learn the task. Without it the penalty, whose gradient per
  channel is proportional to that channel's FLOPs share (18x larger on ResNet-20's first stage
  than on its last), zeroed the first-stage gates of an untrained network and the run never
  recovered (10% accuracy on digits); with ``warmup=0.25`` the same run reached 96%;
- ``min_keep``: snapping never leaves a group with fewer than this fraction of its units, and
  never with none. The paper deletes a residual block whose gates all reach zero; here a
  group keeps one unit because zeroing a group that every path crosses (a residual stream)
  silences the network, and telling the two apart needs a reachability check not built yet;
- ``eps`` stays at ``eps_start`` until the budget is met, then anneals geometrically to
  ``eps_end`` at the last step. Annealing on a fixed clock instead froze the gates (dg/dx ~ eps
  for open gates) before a 25% budget was reached, leaving the decision to the fallback below;
- a gate whose value falls below ``snap`` is set to exactly 0 and held there (momentum could
  otherwise carry it off 0); this is how gates reach the exact zeros the paper prunes. Only as
  many are zeroed as the budget needs (smallest first), so the run lands on the budget instead
  of overshooting it;
- ``Budget(round_to=r)``: decide drops each pruned group's smallest surviving gates down to a
  multiple of r;
- if training ends above budget, the smallest gates are zeroed until it is met (``allocate``).
Surviving gate values are folded into the producers, so the finalized model equals the gated
model with no fine-tuning.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fxprune.budget import allocate, fewest_meeting
from fxprune.errors import ConfigError
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

    def __init__(self, lam: float = 1.0, lam_rate: float = 0.2, eps_start: float = 1.0,
                 eps_end: float = 1e-3, snap: float = 0.05, init: float = 1.0,
                 warmup: float = 0.25, min_keep: float = 0.0, total_steps: int | None = None) -> None:
        super().__init__()
        self.lam, self.lam_rate, self.warmup, self.min_keep = lam, lam_rate, warmup, min_keep
        self.eps_start, self.eps_end, self.snap, self.init = eps_start, eps_end, snap, init
        self.total_steps = total_steps
        self.met_at: int | None = None  # the step at which the hard FLOPs first met the budget
        self._dense_macs = 1.0

    def make_gate(self, group) -> Gate:
        return GDPGate(group.size, group.id, self.eps_start, self.init)

    def prepare(self, gm, cg, cost, targets):
        if not self.total_steps:
            raise ConfigError("gdp needs total_steps (the number of optimizer steps you will train) for its "
                              "warm-up, lam and eps schedules: fxprune.prepare(..., total_steps=epochs * len(loader))")
        gated = super().prepare(gm, cg, cost, targets)
        self._dense_macs = float(targets.dense_macs)
        return gated

    def soft_keep(self) -> dict[int, torch.Tensor]:
        return {gid: gate.values() for gid, gate in self.gates.items()}

    def hard_keep(self) -> dict[int, np.ndarray]:
        return {gid: (gate.values() > 0).detach().numpy() for gid, gate in self.gates.items()}

    def _warming(self) -> bool:
        return self.steps < self.warmup * self.total_steps

    def loss(self) -> torch.Tensor:
        if self._warming():
            return torch.zeros(())
        return self.lam * self.cost.macs(self.soft_keep()) / self._dense_macs

    def step(self) -> None:
        """Warm-up, then search (lam grows until the budget is met), then polarize (eps anneals)."""
        super().step()
        if self._warming():
            return
        with torch.no_grad():
            self._snap()
            if self.met_at is None and self.targets.met(self.cost, self.hard_keep()):
                self.met_at = self.steps
            factor = (1 + self.lam_rate) ** (100 / self.total_steps)
            self.lam = self.lam * factor if self.met_at is None else self.lam / factor
            if self.met_at is not None:
                t = min((self.steps - self.met_at) / max(self.total_steps - self.met_at, 1), 1.0)
                eps = self.eps_start * (self.eps_end / self.eps_start) ** t
                for gate in self.gates.values():
                    gate.eps.fill_(eps)

    def _snap(self) -> None:
        """Zero gates below ``snap``, smallest first, but no more than the budget needs.

        Zeroing is irreversible, and many gates cross ``snap`` in the same step once ``lam`` is
        large; snapping all of them overshot the budget (35% of FLOPs for a 50% target). The
        binary search finds the shortest prefix of the sorted candidates that meets the budget.
        """
        values = {gid: gate.values() for gid, gate in self.gates.items()}
        cands = []
        for gid, v in values.items():
            alive = int((v > 0).sum())
            floor = max(1, int(np.ceil(self.min_keep * len(v))))
            low = torch.nonzero((v > 0) & (v < self.snap)).flatten()
            low = low[torch.argsort(v[low])][: max(alive - floor, 0)]
            cands += [(float(v[u]), gid, int(u)) for u in low]
        cands.sort()
        if not cands:
            return
        keep = self.hard_keep()
        if self.targets.met(self.cost, keep):
            return

        def zeroed(k: int) -> dict[int, np.ndarray]:
            out = {gid: m.copy() for gid, m in keep.items()}
            for _, gid, u in cands[:k]:
                out[gid][u] = False
            return out

        k = fewest_meeting(self.cost, self.targets, zeroed, len(cands))
        for gid, mask in zeroed(len(cands) if k is None else k).items():
            self.zero_units(self.gates[gid], torch.as_tensor(~mask))

    def zero_units(self, gate: Gate, removed: torch.Tensor) -> None:
        gate.alive[removed] = 0.0
        gate.weight[removed] = 0.0

    def decide(self) -> dict[int, np.ndarray]:
        keep = self._round_down(self.hard_keep())
        for mask in keep.values():  # count a dead group as one channel: its branch may stay
            if not mask.any():
                mask[0] = True
        if not self.targets.met(self.cost, keep):
            # Training stopped above budget: rank the surviving gates; dead ones rank lowest.
            scores = {gid: gate.values().detach().double().numpy() for gid, gate in self.gates.items()}
            keep = allocate(self.cost, self.targets, scores)
        self.apply_keep(keep)
        return keep

    def _round_down(self, keep: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """Honour ``Budget(round_to=r)``: drop a group's smallest surviving gates down to a
        multiple of r. Removing channels only lowers the cost, so a met budget stays met; a group
        with fewer than r survivors keeps them all (a zeroed gate cannot be revived exactly)."""
        r = self.targets.round_to
        if r == 1:
            return keep
        for gid, mask in keep.items():
            alive = np.nonzero(mask)[0]
            if len(alive) == len(mask) or len(alive) < r:  # untouched groups keep their width
                continue
            extra = len(alive) % r
            if extra:
                values = self.gates[gid].values().detach().numpy()[alive]
                mask[alive[np.argsort(values, kind="stable")[:extra]]] = False
        return keep

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "lam": self.lam, "met_at": self.met_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.lam, self.met_at = float(state["lam"]), state["met_at"]

    def describe(self) -> dict[str, Any]:
        return {"lam": self.lam, "lam_rate": self.lam_rate, "eps_start": self.eps_start,
                "eps_end": self.eps_end, "snap": self.snap, "init": self.init,
                "warmup": self.warmup, "min_keep": self.min_keep}
