"""GDP: Gates with Differentiable Polarization (Guo et al., ICCV 2021), see METHODS.md §1.

Per unit a trainable scalar x and the smoothed-L0 gate g = x^2 / (x^2 + eps): g(0) = 0 exactly
and dg/dx = 0 there, so a gate that reaches 0 stays there. Training minimises
task loss + lam * FLOPs(g) / FLOPs(dense), FLOPs bilinear in the gates through the cost model
(under a latency budget, the backend's latency predictor in place of FLOPs: ``fxprune.lpnet``).

Choices that are this library's [A], because the paper leaves them open:
- placement: one gate per channel group at the group's producers (after their BatchNorm),
  shared by all of them; gates there fold exactly into the producers;
- ``relative`` (off by default): the penalty and the snapping see g / max(g over the group).
  A normalisation layer after a group erases the group's scale, so the task loss cannot resist
  a group shrinking as a whole; relative to the group's largest gate only the *shape* of a
  group's gates is pushed, where the task loss does push back. On the validation split it tied
  with the paper's absolute gates (mean over 50/25/10% FLOPs 0.867 both), so the paper's form
  stays the default and this one is benchmarked beside it;
- ``init``: the gates' starting value (0.9, with ``eps_start=1e-2``): x starts where dg/dx is
  large enough for the penalty to move it. fxprune's first GDP emptied ResNet-20's first- and
  second-stage residual streams down to one channel (the FLOPs penalty pushes each unit by its
  FLOPs share, 18x more on the first stream than on the last) at 25% FLOPs, -17 pt after
  fine-tuning (benchmarks/results/methods_gdp_v1.md); with this start and the gradual schedule
  below every stream keeps at least 30% of its width at 10% FLOPs (methods.md beside it).
  Starting at x = 1 with a small eps froze the gates (dg/dx ~ 2 eps), and a large eps (1.0:
  every gate at 0.5, fxprune's first default) left the network running on half-closed channels
  that snapping then removed at chance accuracy;
- three phases over ``total_steps`` (required): warm-up, search, polarize. For the first
  ``warmup`` fraction the penalty is off: the network and the gates first learn the task.
  During the next ``search`` fraction the allowed cost (``path``, ``fxprune.schedules.linear_path``)
  falls linearly from dense to the budget; ``lam`` (``fxprune.schedules.AdaptiveWeight``) grows
  by the factor ``1 + lam_rate`` per 1% of training while the *hard* FLOPs (every non-zero gate
  counted as kept) exceed the path and shrinks at that rate otherwise, so channels go gradually
  and the network adapts as they go. Growing ``lam`` until
  the budget itself was met (fxprune's first schedule) multiplied it by 100 in two epochs and
  pruned 75% of the FLOPs within one, at chance accuracy. Once the budget is met (permanently:
  zeroed gates stay zero) ``lam`` keeps shrinking and ``eps`` anneals geometrically to
  ``eps_end`` at the last step, polarizing the surviving gates towards 1;
- ``min_keep``: snapping never leaves a group with fewer than this fraction of its units. As in
  the paper, a group may lose every unit when some input-to-output path bypasses it (a residual
  block's internal channels: ``fxprune.analysis.bypassed_groups``); finalize then replaces the
  dead branch by its constant. A group that every path crosses (a residual stream, a plain
  chain) keeps at least one unit, since zeroing it would silence the network
  (``block_removal=False``: every group keeps a unit, as fxprune's GDP did before);
- ``penalty``: ``"flops"`` (default, the paper's bilinear FLOPs) or ``"uniform"`` (the mean
  gate value: every unit pushed alike, the FLOPs budget enforced only by the snapping order),
  offered to compare (benchmarked with the first schedule: benchmarks/results/methods_gdp_v1.md),
  not tuned;
- a gate whose value (relative to its group's largest with ``relative``) falls below ``snap``
  is set to exactly 0 and held there (momentum could otherwise carry it off 0); this is how gates
  reach the exact zeros the paper prunes. Only as many are zeroed as the path needs (smallest
  first), so the run lands on the budget instead of overshooting it;
- ``Budget(round_to=r)``: decide drops each pruned group's smallest surviving gates down to a
  multiple of r;
- if training ends above budget, the smallest gates are zeroed until it is met (``allocate``).
Defaults were chosen on a validation split of digits-hard's training images (``fxprune bench
--validation 0.2``; benchmarks/results/methods_gdp_validation.md), never on its test split.
Surviving gate values are folded into the producers, so the finalized model equals the gated
model with no fine-tuning. ``report`` gives the polarization the paper's name promises (fractions
of units at exactly 0, at >= 0.95 and undecided in between) and the step the budget was met at.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from fxprune.analysis import bypassed_groups
from fxprune.budget import Targets, allocate, fewest_meeting
from fxprune.errors import ConfigError
from fxprune.decision import Decision
from fxprune.method import Context, register_method
from fxprune.passes.gates import Gate
from fxprune.passes.methods.gated import GateMethod, round_down
from fxprune.schedules import AdaptiveWeight, linear_path, progress


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
    eps_start: float = 1e-2
    eps_end: float = 1e-4
    snap: float = 0.05
    init: float = 0.9
    warmup: float = 0.25
    min_keep: float = 0.0
    penalty: str = "flops"
    block_removal: bool = True
    relative: bool = False
    search: float = 0.5


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
        if not 0.0 < self.options.init < 1.0:
            raise ConfigError(f"gdp init is the gates' starting value and must be in (0, 1), got {self.options.init!r}")
        self.lam_weight: AdaptiveWeight | None = None  # lam's schedule, made once total_steps is known
        self.met_at: int | None = None  # the step at which the hard FLOPs first met the budget
        self.bypassed: set[int] = set()

    def prepare(self, ctx: Context) -> None:
        super().prepare(ctx)
        # lam shrinks freely once on the path (floor 0): the penalty eases off as far as the task needs;
        # lam=0 switches the penalty off for good
        o = self.options
        self.lam_weight = AdaptiveWeight(o.lam, o.lam_rate, ctx.total_steps, floor=0.0) if o.lam > 0 else None
        self.bypassed = bypassed_groups(ctx.traced, ctx.graph) if self.options.block_removal else set()

    @property
    def lam(self) -> float:
        """The penalty's current weight (``options.lam`` before ``prepare``)."""
        return self.lam_weight.value if self.lam_weight is not None else self.options.lam

    def make_gate(self, group) -> Gate:
        o = self.options  # x where g(x) = init: there dg/dx is large enough for the penalty to act
        return GDPGate(group.size, group.id, o.eps_start, float(np.sqrt(o.eps_start * o.init / (1 - o.init))))

    def soft_keep(self) -> dict[int, torch.Tensor]:
        """Gate values as the penalty and the snapping see them: divided by their group's largest
        (``relative``), since a normalisation layer after the group erases the group's scale."""
        values = {gid: gate.values() for gid, gate in self.gates.items()}
        if not self.options.relative:
            return values
        return {gid: v / v.max().clamp_min(1e-12) for gid, v in values.items()}

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
        name = ctx.targets.primary  # FLOPs, or the latency predictor under a latency budget
        return self.lam * ctx.cost.resource(name)(soft) / float(ctx.targets.dense[name])

    def path(self, ctx: Context) -> Targets:
        """The limits allowed now: from dense at the end of the warm-up down to the budget
        ``search`` of the training later, linearly."""
        o = self.options
        done = progress(ctx.step, o.warmup * ctx.total_steps, o.search * ctx.total_steps)
        t = ctx.targets
        return replace(t, limits={k: int(linear_path(t.dense[k], v, done)) for k, v in t.limits.items()})

    def after_step(self, ctx: Context) -> None:
        """Warm-up, then search (lam steers the hard cost along ``path`` until the budget is met),
        then polarize (eps anneals)."""
        if self._warming(ctx):
            return
        o = self.options
        with torch.no_grad():
            path = self.path(ctx)
            self._snap(ctx, path)
            keep = self.hard_keep()
            if self.met_at is None and ctx.targets.met(ctx.cost, keep):
                self.met_at = ctx.step
            if self.lam_weight is not None:
                self.lam_weight.update(grow=self.met_at is None and not path.met(ctx.cost, keep))
            if self.met_at is not None:
                t = progress(ctx.step, self.met_at, ctx.total_steps - self.met_at)
                eps = o.eps_start * (o.eps_end / o.eps_start) ** t
                for gate in self.gates.values():
                    gate.eps.fill_(eps)

    def _snap(self, ctx: Context, targets: Targets) -> None:
        """Zero gates below ``snap``, smallest first, but no more than ``targets`` need.

        Zeroing is irreversible, and many gates cross ``snap`` in the same step once ``lam`` is
        large; snapping all of them overshot the budget (35% of FLOPs for a 50% target). The
        binary search finds the shortest prefix of the sorted candidates that meets the budget.
        """
        values = self.soft_keep()
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
        if targets.met(ctx.cost, keep):
            return

        def zeroed(k: int) -> dict[int, np.ndarray]:
            out = {gid: m.copy() for gid, m in keep.items()}
            for _, gid, u in cands[:k]:
                out[gid][u] = False
            return out

        k = fewest_meeting(ctx.cost, targets, zeroed, len(cands))
        for gid, mask in zeroed(len(cands) if k is None else k).items():
            self.zero_units(self.gates[gid], torch.as_tensor(~mask))

    @staticmethod
    def zero_units(gate: GDPGate, removed: torch.Tensor) -> None:
        gate.alive[removed] = 0.0
        gate.weight[removed] = 0.0

    def decide(self, ctx: Context, data: Any = None) -> Decision:
        values = {gid: gate.values().detach().numpy() for gid, gate in self.gates.items()}
        keep = round_down(self.hard_keep(), values, ctx.targets.round_to)
        for gid, mask in keep.items():  # only a bypassed group may die: finalize drops its branch
            if not mask.any() and gid not in self.bypassed:
                mask[0] = True
        if not ctx.targets.met(ctx.cost, keep):
            # Training stopped above budget: rank the surviving gates; dead ones rank lowest.
            scores = {gid: v.detach().double().numpy() for gid, v in self.soft_keep().items()}
            keep = allocate(ctx.cost, ctx.targets, scores)
        scale = {gid: gate.values().detach().float() for gid, gate in self.gates.items()}
        return Decision(keep, scale)

    def schedule(self, ctx: Context) -> dict[str, float]:
        eps = next(iter(self.gates.values())).eps.item() if self.gates else self.options.eps_start
        return {"lam": self.lam, "eps": eps, "macs": float(ctx.cost.macs(self.hard_keep()))}

    def polarization(self) -> dict[str, float]:
        """How far the paper's premise holds: the gates as the penalty sees them (``soft_keep``)
        split into exact zeros, survivors near 1 (>= 0.95: folding them changes little) and
        undecided survivors in (0.05, 0.95), each a fraction of all units."""
        v = np.concatenate([g.detach().double().numpy() for g in self.soft_keep().values()]) if self.gates else np.ones(1)
        return {"zero_fraction": float((v == 0).mean()), "polarized_fraction": float((v >= 0.95).mean()),
                "undecided_fraction": float(((v > 0.05) & (v < 0.95)).mean())}

    def report(self, ctx: Context) -> dict[str, Any]:
        """Polarization at the end of training, the step the budget was met at (None: never, the
        allocator finished the job) and as a fraction of training, the final eps and lam."""
        eps = next(iter(self.gates.values())).eps.item() if self.gates else self.options.eps_start
        met = self.met_at / ctx.total_steps if self.met_at is not None and ctx.total_steps else None
        return {**self.polarization(), "met_at": self.met_at, "met_at_fraction": met, "eps": eps, "lam": self.lam}

    def state_dict(self) -> dict[str, Any]:
        return {"lam": self.lam, "met_at": self.met_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.lam_weight is not None:
            self.lam_weight.value = float(state["lam"])
        self.met_at = state["met_at"]
