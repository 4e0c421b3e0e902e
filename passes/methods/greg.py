"""GReg-1 and GReg-2: Neural Pruning via Growing Regularization (Wang et al., ICLR 2021), METHODS.md §6.

Mechanism (official code, ``pruner/reg_pruner.py``, CIFAR settings): an L2 penalty
sum_j lam_j / 2 * ||w_j||^2 on the filters of the pruned set P, trained with its own rate
``lr_prune`` = 1e-3; every ``interval`` = 10 iterations lam_P grows by ``delta`` = 1e-4, until
max lam reaches ``tau`` = 1 or (GReg-1) every layer's kept/pruned mean-magnitude ratio, an EMA
(0.9 per update), reaches ``mag_ratio_limit`` = 1000; lam then stays constant for ``stabilize`` =
10,000 iterations and P is removed (``decide``).

- GReg-1 chooses P once, by filter L1 magnitude, when the regularization starts.
- GReg-2 first *picks*: every prunable filter gets the same lam, +``pick_delta`` = 1e-5 per
  update up to ``pick_limit`` = 1e-2, so magnitudes separate by local curvature; then P by L1,
  and P's lam goes on growing from ``pick_limit`` (it does not restart) while kept filters get the
  constant ``recover`` = -1e-4; each group stops growing on its own (ratio or tau).

The official schedule (110k iterations for GReg-1: sum of lr_prune * lam = 60.0; GReg-2 119k,
pick phase 0.05) is laid over the run's regularization steps by ``fxprune.schedules.Clock``: each
step stands for ``per_step`` official iterations, lam takes every official update that falls in
it, and the penalty of those iterations is applied after the optimizer step as the official
per-iteration factor repeated, ``w_P *= (1 - lr_prune * lam) ** per_step``. So sum lr * lam and
the shrink of P are the official ones at any run length (a step applies the lam reached by its
updates, which adds half a step's increment: +1% to the sum at 100 steps), and a step never shrinks a filter past
zero (options need lr_prune * tau < 1); a gradient ``grad += lam * w`` of the compressed strength
(lr * lam of several per step) made the training diverge. What differs from the official run:
one step takes hundreds of iterations of penalty but one task step, so where a BatchNorm follows
the conv (its task gradient grows as 1/|w| while w shrinks) the pruned filters are re-drawn by
each step's gradient and shrunk again, instead of settling as they do over 1e-3-sized
iterations: the ratio stop (EMA, 0.9 per official update) rarely fires before tau, the pruned
channels act as noise in the unpruned model (its accuracy drops) and ``bn_recalibration`` matters
after finalize (resnet20/digits-hard, 8 epochs: the ratio ends near 6000).

Choices that are this library's [A]:
- the penalty is the exact repeated factor, not ``grad += lam * w`` through SGD momentum (the
  official's momentum 0.9 would amplify it up to 10x; the ratio stop ends growth far earlier);
  the task gradient uses the run's optimizer and rate, not lr_prune (a step stands for hundreds
  of official iterations, which no single task step can);
- the first ``start`` = 50% of the steps is ordinary training (runs here start from scratch;
  the official starts from a trained model: ``start=0``); stabilize lasts to the end of the run
  (at least the official 10k iterations; the official prunes right then);
- P comes from the shared allocator under the budget (``fxprune.budget.allocate`` on per-group
  mean-normalised L1 scores, as ``l1``) instead of fixed per-stage ratios; a unit's filters are all
  its producers' filters, and the ratio stop is per channel group, not per conv;
- GReg-2's EMA starts when P is chosen (the official also tracks candidate sets during the pick).
Not Torch-Pruning's ``GrowingRegPruner`` (which weights the increment by normalised importance).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fxprune import scores
from fxprune.budget import allocate
from fxprune.decision import Decision
from fxprune.errors import ConfigError
from fxprune.method import Context, Method, register_method
from fxprune.schedules import Clock


@dataclass
class Rows:
    """The output rows (filters) of one parameter, the unit each belongs to, and the index of the
    producer layer they come from (in ``ctx.graph.layers``)."""

    qualname: str
    dim: int
    group: int
    units: torch.Tensor  # unit index of each row
    layer: int = -1


def producer_rows(ctx: Context, with_bias: bool = False) -> list[Rows]:
    """Every prunable group's producer weights (and biases), row by row."""
    index = {l.node: i for i, l in enumerate(ctx.graph.layers)}
    out = []
    for g in ctx.graph.prunable_groups:
        for site in g.sites:
            if site.node not in index:
                continue
            layer = ctx.graph.layers[index[site.node]]
            units = torch.as_tensor(site.units, dtype=torch.long)
            out.append(Rows(layer.weight, 1 if layer.kind == "conv_transpose" else 0, g.id, units, index[site.node]))
            if with_bias and layer.bias:
                out.append(Rows(layer.bias, 0, g.id, units, index[site.node]))
    return out


def _broadcast(values: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return values.view(shape)


@dataclass(frozen=True)
class GRegSchedule:
    """The official CIFAR schedule (iterations are official ones; ``start`` a fraction of the run)."""

    start: float = 0.5
    lr_prune: float = 1e-3
    delta: float = 1e-4
    interval: int = 10
    tau: float = 1.0
    stabilize: int = 10_000
    mag_ratio_limit: float = 1000.0


@dataclass(frozen=True)
class GRegOptions(GRegSchedule):
    score: str = "l1"


def check_schedule(name: str, o: GRegSchedule) -> None:
    """Refuse a schedule that cannot run: ``ConfigError`` naming the method and the options."""
    if not (0 <= o.start < 1 and o.delta > 0 and o.tau > 0 and o.stabilize >= 0 and o.interval >= 1):
        raise ConfigError(f"{name}: need 0 <= start < 1, delta > 0, tau > 0, stabilize >= 0, interval >= 1 (got {o})")
    if not 0 < o.lr_prune * o.tau < 1:
        raise ConfigError(f"{name}: lr_prune * tau must lie in (0, 1) (the per-iteration shrink 1 - lr_prune * lam), "
                          f"got lr_prune={o.lr_prune}, tau={o.tau}")


class GrowingRegularization(Method):
    """Shared machinery: the clock, the pruned set, lam per unit, the penalty and the stop rule."""

    needs_training = True
    needs_total_steps = True
    ratio_stop = True       # TPP's official schedule grows to tau whatever the magnitudes
    lam_from = 0.0          # where P's lam starts growing (GReg-2: the pick limit)

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        check_schedule(self.name, self.options)
        self.lam: dict[int, torch.Tensor] = {}     # group -> lam per unit
        self.pruned: dict[int, np.ndarray] = {}    # group -> bool per unit (P), once chosen
        self.ratio_ema: dict[int, float] = {}
        self.updates: dict[int, int] = {}          # group -> growth updates of P's lam so far
        self.done: set[int] = set()                # groups whose lam stopped growing
        self.phase = "train"
        self.iterations: dict[str, float] = {}     # official iterations spent per phase
        self.integrated = 0.0                      # sum over official iterations of lr_prune * max lam
        self.rows: list[Rows] = []
        self.begin, self.clock = 0, Clock(1.0, 1)

    def official_iterations(self) -> float:
        """The whole official schedule: growth from ``lam_from`` to tau, then stabilize."""
        o = self.options
        return o.interval * max(o.tau - self.lam_from, 0.0) / o.delta + o.stabilize

    def prepare(self, ctx: Context) -> None:
        self.rows = producer_rows(ctx)
        self.lam = {g.id: torch.zeros(g.size) for g in ctx.graph.prunable_groups}
        self.begin = int(self.options.start * ctx.total_steps)
        self.clock = Clock(self.official_iterations(), max(ctx.total_steps - self.begin, 1))

    # ---- the pruned set --------------------------------------------------------------------------
    def choose(self, ctx: Context, data: Any = None) -> None:
        """P: the units the budget removes, ranked by (normalised) filter magnitude."""
        keep = allocate(ctx.cost, ctx.targets, scores.group_scores(self.options.score, ctx.module, ctx.graph, data))
        self.pruned = {gid: ~mask for gid, mask in keep.items()}

    def decide(self, ctx: Context, data: Any = None) -> Decision:
        if not self.pruned:  # trained too briefly to reach the regularization: choose now
            self.choose(ctx, data)
        return Decision({gid: ~p for gid, p in self.pruned.items()})

    # ---- one run step ----------------------------------------------------------------------------
    def after_step(self, ctx: Context) -> None:
        step = ctx.step - self.begin
        if step <= 0:
            return
        events = self.clock.events(step, self.options.interval)
        growing = self.advance(ctx, events)
        n = self.clock.per_step
        self.shrink(ctx, self.penalized_rows(), n)
        if growing:  # the stop rule reads the magnitudes the next iteration starts from
            self.observe(ctx, events)
        self.integrated += self.options.lr_prune * self.lam_max() * n
        self.iterations[self.phase] = self.iterations.get(self.phase, 0.0) + n

    def advance(self, ctx: Context, events: int) -> bool:
        """GReg-1: P at the first regularization step, then ``events`` growth updates. Returns
        whether lam grew (the stop rule is due)."""
        if not self.pruned:
            self.choose(ctx)
            self.phase = "grow"
        if self.phase == "grow" and events:
            self.grow(events)
            return True
        return False

    def penalized_rows(self) -> list[Rows]:
        return self.rows

    def shrink(self, ctx: Context, rows: list[Rows], iterations: float) -> None:
        """The penalty of ``iterations`` official iterations: each row times (1 - lr_prune * lam)^n."""
        with torch.no_grad():
            for r in rows:
                lam = self.lam[r.group][r.units]
                if lam.any():
                    p = ctx.module.get_parameter(r.qualname)
                    factor = (1 - self.options.lr_prune * lam.double()) ** iterations
                    p.mul_(_broadcast(factor.to(p.dtype), r.dim, p.dim()))

    def magnitude_ratios(self, ctx: Context) -> dict[int, float]:
        """Per group: mean L1 of kept filters over mean L1 of pruned ones (a unit's filters summed
        over its producers, as ``fxprune.scores.l1``)."""
        out = {}
        for gid, pruned in self.pruned.items():
            if pruned.any() and (~pruned).any():
                l1 = scores.l1(ctx.module, ctx.graph, ctx.graph.group(gid))
                out[gid] = float(l1[~pruned].mean()) / max(float(l1[pruned].mean()), 1e-30)
        return out

    def grow(self, events: int) -> None:
        """``events`` official updates: P's lam + events * delta, up to tau."""
        o = self.options
        for gid, pruned in self.pruned.items():
            if gid not in self.done:
                self.updates[gid] = self.updates.get(gid, 0) + events
                self.lam[gid][torch.as_tensor(pruned)] = min(self.lam_from + self.updates[gid] * o.delta, o.tau)

    def observe(self, ctx: Context, events: int) -> None:
        """The ratio EMA (0.9 per official update, so 0.9^events here), then the stop rule."""
        keep = 0.9 ** events
        for gid, ratio in self.magnitude_ratios(ctx).items():
            self.ratio_ema[gid] = keep * self.ratio_ema.get(gid, ratio) + (1 - keep) * ratio
        self.stop(ctx)

    def stop(self, ctx: Context) -> None:
        """GReg-1 (``_inc_reg``): stop when every group's ratio reached the limit, or lam reached tau."""
        ratios = self.ratio_ema.values()
        reached = self.ratio_stop and bool(ratios) and all(r >= self.options.mag_ratio_limit for r in ratios)
        if reached or self.lam_max() >= self.options.tau:
            self.done = set(self.pruned)
            self.phase = "stabilize"

    def lam_max(self) -> float:
        return max((float(l.max()) for l in self.lam.values()), default=0.0)

    # ---- what it tells ---------------------------------------------------------------------------
    def schedule(self, ctx: Context) -> dict[str, float]:
        return {"lam_max": self.lam_max(), "mag_ratio_min": min(self.ratio_ema.values(), default=0.0),
                "integrated_lr_lam": self.integrated}

    def report(self, ctx: Context) -> dict[str, Any]:
        now = self.magnitude_ratios(ctx)
        return {"mag_ratio_min": min(now.values(), default=None), "mag_ratio_median":
                float(np.median(list(now.values()))) if now else None, "integrated_lr_lam": self.integrated,
                "official_integrated_lr_lam": self.official_integrated(), "lam_max": self.lam_max(),
                "official_iterations_per_step": self.clock.per_step, "official_iterations": dict(self.iterations),
                "steps": {phase: round(n / self.clock.per_step) for phase, n in self.iterations.items()}}

    def official_integrated(self) -> float:
        """Sum of lr_prune * lam over the whole official schedule without an early stop."""
        o = self.options
        n = round((o.tau - self.lam_from) / o.delta)
        grow = o.interval * sum(min(self.lam_from + k * o.delta, o.tau) for k in range(1, n + 1))
        return o.lr_prune * (grow + o.tau * o.stabilize)

    def state_dict(self) -> dict[str, Any]:
        return {"lam": {g: l.clone() for g, l in self.lam.items()},
                "pruned": {g: p.copy() for g, p in self.pruned.items()},
                "ratio_ema": dict(self.ratio_ema), "updates": dict(self.updates), "done": sorted(self.done),
                "phase": self.phase, "iterations": dict(self.iterations), "integrated": self.integrated}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lam = {int(g): l.clone() for g, l in state["lam"].items()}
        self.pruned = {int(g): np.asarray(p, bool).copy() for g, p in state["pruned"].items()}
        self.ratio_ema = {int(g): float(v) for g, v in state["ratio_ema"].items()}
        self.updates = {int(g): int(v) for g, v in state["updates"].items()}
        self.done = {int(g) for g in state["done"]}
        self.phase, self.integrated = str(state["phase"]), float(state["integrated"])
        self.iterations = {str(k): float(v) for k, v in state["iterations"].items()}


@register_method
class GReg1(GrowingRegularization):
    """GReg-1: P fixed by L1 when the regularization starts; lam_P grows, then stabilizes."""

    name = "greg1"
    Options = GRegOptions


@dataclass(frozen=True)
class GReg2Options(GRegOptions):
    pick_delta: float = 1e-5
    pick_limit: float = 1e-2
    recover: float = -1e-4


@register_method
class GReg2(GrowingRegularization):
    """GReg-2 (``_ada_reg``): a uniform growing lam on every prunable filter (pick), then P by
    L1; P's lam grows on from the pick limit while kept filters get ``recover``."""

    name = "greg2"
    Options = GReg2Options

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        if not (0 < o.pick_delta <= o.pick_limit < o.tau):
            raise ConfigError(f"greg2: need 0 < pick_delta <= pick_limit < tau, got {o}")
        self.lam_from = o.pick_limit
        self.picks = 0

    def official_iterations(self) -> float:
        o = self.options
        return o.interval * o.pick_limit / o.pick_delta + super().official_iterations()

    def official_integrated(self) -> float:
        o = self.options
        picks = round(o.pick_limit / o.pick_delta)
        return super().official_integrated() + o.lr_prune * o.interval * o.pick_delta * picks * (picks + 1) / 2

    def advance(self, ctx: Context, events: int) -> bool:
        o = self.options
        if self.phase in ("train", "pick"):
            self.phase = "pick"
            self.picks += events
            lam = min(self.picks * o.pick_delta, o.pick_limit)
            for l in self.lam.values():
                l.fill_(lam)
            if lam >= o.pick_limit * (1 - 1e-9):
                self.choose(ctx)
                for gid, pruned in self.pruned.items():
                    self.lam[gid] = torch.where(torch.as_tensor(pruned), torch.full((), lam), torch.full((), o.recover))
                self.phase = "grow"
            return False
        if self.phase == "grow" and events:
            self.grow(events)
            return True
        return False

    def stop(self, ctx: Context) -> None:
        """Per group (official: per layer): finished once its ratio reached the limit or lam tau."""
        o = self.options
        for gid, pruned in self.pruned.items():
            ratio, lam = self.ratio_ema.get(gid, 0.0), float(self.lam[gid].max())
            if not pruned.any() or ratio >= o.mag_ratio_limit or lam >= o.tau:  # nothing pruned: done at once
                self.done.add(gid)
        if self.done >= set(self.pruned):
            self.phase = "stabilize"

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "picks": self.picks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.picks = int(state["picks"])
