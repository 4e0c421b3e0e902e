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
- ``min_keep``: snapping never leaves a group with fewer than this fraction of its units. As in
  the paper, a group may lose every unit when some input-to-output path bypasses it (a residual
  block's internal channels: ``fxprune.analysis.bypassed_groups``); finalize then replaces the
  dead branch by its constant. A group that every path crosses (a residual stream, a plain
  chain) keeps at least one unit, since zeroing it would silence the network
  (``block_removal=False``: every group keeps a unit, as fxprune's GDP did before);
- ``penalty``: ``"flops"`` (default, the paper's bilinear FLOPs) or ``"uniform"`` (the mean
  gate value: every unit pushed alike, the FLOPs budget enforced only by the snapping order).
  The FLOPs penalty pushes each unit in proportion to its share of the FLOPs, 18x harder on
  ResNet-20's first-stage residual stream than on its last stage, which empties that stream
  first; ``"uniform"`` is offered to compare (benchmarks/results/methods.md), not tuned;
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

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fxprune.analysis import bypassed_groups
from fxprune.budget import allocate, fewest_meeting
from fxprune.errors import ConfigError
from fxprune.decision import Decision
from fxprune.method import Context, register_method
from fxprune.passes.gates import Gate
from fxprune.passes.methods.gated import GateMethod


class GDPGate(Gate):
    """g = alive * x^2 / (x^2 + eps), one x per unit."""

    def __init__(self, size: int, group_id: int, eps: float, init: float):
        super().__init__(size, group_id, init)
        self.register_buffer("eps", torch.tensor(float(eps)))
        self.register_buffer("alive", torch.ones(size))

    def values(self) -> torch.Tensor:
        x2 = self.weight * self.weight
        return self.alive * x2 / (x2 + self.eps)


@dataclass(frozen=True)
class GDPOptions:
    lam: float = 1.0
    lam_rate: float = 0.2
    eps_start: float = 1.0
    eps_end: float = 1e-3
    snap: float = 0.05
    init: float = 1.0
    warmup: float = 0.25
    min_keep: float = 0.0
    penalty: str = "flops"
    block_removal: bool = True


@register_method
class GDP(GateMethod):
    """Gates with Differentiable Polarization; hyper-parameters documented in the module docstring."""

    name = "gdp"
    Options = GDPOptions
    needs_training = True
    needs_total_steps = True

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.options.penalty not in ("flops", "uniform"):
            raise ConfigError(f"gdp penalty must be 'flops' or 'uniform', got {self.options.penalty!r}")
        self.lam = self.options.lam
        self.met_at: int | None = None  # the step at which the hard FLOPs first met the budget
        self.bypassed: set[int] = set()

    def prepare(self, ctx: Context) -> None:
        super().prepare(ctx)
        self.bypassed = bypassed_groups(ctx.traced, ctx.graph) if self.options.block_removal else set()

    def make_gate(self, group) -> Gate:
        return GDPGate(group.size, group.id, self.options.eps_start, self.options.init)

    def soft_keep(self) -> dict[int, torch.Tensor]:
        return {gid: gate.values() for gid, gate in self.gates.items()}

    def hard_keep(self) -> dict[int, np.ndarray]:
        return {gid: (gate.values() > 0).detach().numpy() for gid, gate in self.gates.items()}

    def _warming(self, ctx: Context) -> bool:
        return ctx.step < self.options.warmup * ctx.total_steps

    def loss(self, ctx: Context) -> torch.Tensor:
        if self._warming(ctx):
            return torch.zeros(())
        soft = self.soft_keep()
        if self.options.penalty == "uniform":  # every unit pushed alike; snapping keeps the budget
            return self.lam * sum(v.sum() for v in soft.values()) / sum(v.numel() for v in soft.values())
        return self.lam * ctx.cost.macs(soft) / float(ctx.targets.dense_macs)

    def after_step(self, ctx: Context) -> None:
        """Warm-up, then search (lam grows until the budget is met), then polarize (eps anneals)."""
        if self._warming(ctx):
            return
        o = self.options
        with torch.no_grad():
            self._snap(ctx)
            if self.met_at is None and ctx.targets.met(ctx.cost, self.hard_keep()):
                self.met_at = ctx.step
            factor = (1 + o.lam_rate) ** (100 / ctx.total_steps)
            self.lam = self.lam * factor if self.met_at is None else self.lam / factor
            if self.met_at is not None:
                t = min((ctx.step - self.met_at) / max(ctx.total_steps - self.met_at, 1), 1.0)
                eps = o.eps_start * (o.eps_end / o.eps_start) ** t
                for gate in self.gates.values():
                    gate.eps.fill_(eps)

    def _snap(self, ctx: Context) -> None:
        """Zero gates below ``snap``, smallest first, but no more than the budget needs.

        Zeroing is irreversible, and many gates cross ``snap`` in the same step once ``lam`` is
        large; snapping all of them overshot the budget (35% of FLOPs for a 50% target). The
        binary search finds the shortest prefix of the sorted candidates that meets the budget.
        """
        values = {gid: gate.values() for gid, gate in self.gates.items()}
        cands = []
        for gid, v in values.items():
            alive = int((v > 0).sum())
            floor = int(np.ceil(self.options.min_keep * len(v)))
            if gid not in self.bypassed:
                floor = max(floor, 1)
            low = torch.nonzero((v > 0) & (v < self.options.snap)).flatten()
            low = low[torch.argsort(v[low])][: max(alive - floor, 0)]
            cands += [(float(v[u]), gid, int(u)) for u in low]
        cands.sort()
        if not cands:
            return
        keep = self.hard_keep()
        if ctx.targets.met(ctx.cost, keep):
            return

        def zeroed(k: int) -> dict[int, np.ndarray]:
            out = {gid: m.copy() for gid, m in keep.items()}
            for _, gid, u in cands[:k]:
                out[gid][u] = False
            return out

        k = fewest_meeting(ctx.cost, ctx.targets, zeroed, len(cands))
        for gid, mask in zeroed(len(cands) if k is None else k).items():
            self.zero_units(self.gates[gid], torch.as_tensor(~mask))

    @staticmethod
    def zero_units(gate: GDPGate, removed: torch.Tensor) -> None:
        gate.alive[removed] = 0.0
        gate.weight[removed] = 0.0

    def decide(self, ctx: Context, data: Any = None) -> Decision:
        keep = self._round_down(ctx, self.hard_keep())
        for gid, mask in keep.items():  # only a bypassed group may die: finalize drops its branch
            if not mask.any() and gid not in self.bypassed:
                mask[0] = True
        if not ctx.targets.met(ctx.cost, keep):
            # Training stopped above budget: rank the surviving gates; dead ones rank lowest.
            scores = {gid: gate.values().detach().double().numpy() for gid, gate in self.gates.items()}
            keep = allocate(ctx.cost, ctx.targets, scores)
        scale = {gid: gate.values().detach().float() for gid, gate in self.gates.items()}
        return Decision(keep, scale)

    def _round_down(self, ctx: Context, keep: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """Honour ``Budget(round_to=r)``: drop a group's smallest surviving gates down to a
        multiple of r. Removing channels only lowers the cost, so a met budget stays met; a group
        with fewer than r survivors keeps them all (a zeroed gate cannot be revived exactly)."""
        r = ctx.targets.round_to
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

    def schedule(self, ctx: Context) -> dict[str, float]:
        eps = next(iter(self.gates.values())).eps.item() if self.gates else self.options.eps_start
        return {"lam": self.lam, "eps": eps, "macs": float(ctx.cost.macs(self.hard_keep()))}

    def state_dict(self) -> dict[str, Any]:
        return {"lam": self.lam, "met_at": self.met_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lam, self.met_at = float(state["lam"]), state["met_at"]
