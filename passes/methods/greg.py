"""GReg-1 and GReg-2: Neural Pruning via Growing Regularization (Wang et al., ICLR 2021), METHODS.md §6.

Mechanism (official code, ``pruner/reg_pruner.py``): a penalty written into the gradient after
backward, ``grad += lam * w`` for the filters of the pruned set P (the gradient of
sum_j lam_j / 2 * ||w_j||^2), with lam growing by ``delta`` every ``interval`` steps, so the
pruned filters shrink smoothly while the network adapts; growth stops once max lam reaches
``tau`` or every group's kept/pruned mean-magnitude ratio (EMA 0.9) reaches ``mag_ratio_limit``;
lam then stays constant ("stabilize") and P is removed at the end (``decide``).

- GReg-1 chooses P once, by filter L1 magnitude, when the regularization starts.
- GReg-2 first runs a *pick* phase: every prunable filter gets the same growing lam (up to
  ``pick_limit``), which lets magnitudes separate by local curvature; then P is chosen by L1,
  and in the prune phase P's lam grows while kept filters get a constant negative ``recover``.

Choices that are this library's [A]:
- P comes from the shared allocator under the budget (``fxprune.budget.allocate`` on per-group
  mean-normalised L1 scores, as ``l1``) instead of the paper's fixed per-stage ratios, so one
  budget (FLOPs, params, round_to) fits every architecture and holds exactly after finalize;
- a unit's filters are all its producers' filters (a residual stream's channel is written by
  several convs); the official code regularises per conv layer and never prunes residual outputs;
- the schedule is scaled to the run: official CIFAR runs grow lam from 0 to tau=1 by 1e-4 every
  10 iterations (100k iterations) and stabilize 10k iterations, starting from a trained model.
  Here the first ``start`` fraction of the steps is ordinary training (runs that start from
  scratch need trained filters before L1 means anything; use ``start=0`` on a trained model),
  lam then reaches ``tau`` after a further ``grow`` fraction (delta = tau * interval /
  (grow * total_steps)), and the rest stabilizes. GReg-2's pick phase takes ``pick`` of the steps
  (official: 1e-5 per 10 iterations up to 1e-2, i.e. a twelfth of the regularization phase).
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


@dataclass
class Rows:
    """The output rows (filters) of one producer parameter and the unit each belongs to."""

    qualname: str
    dim: int
    group: int
    units: torch.Tensor  # unit index of each row


def producer_rows(ctx: Context, with_bias: bool = False) -> list[Rows]:
    """Every prunable group's producer weights (and biases), row by row."""
    layers = {l.node: l for l in ctx.graph.layers}
    out = []
    for g in ctx.graph.prunable_groups:
        for site in g.sites:
            layer = layers.get(site.node)
            if layer is None:
                continue
            units = torch.as_tensor(site.units, dtype=torch.long)
            out.append(Rows(layer.weight, 1 if layer.kind == "conv_transpose" else 0, g.id, units))
            if with_bias and layer.bias:
                out.append(Rows(layer.bias, 0, g.id, units))
    return out


def _broadcast(values: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return values.view(shape)


@dataclass(frozen=True)
class GRegOptions:
    start: float = 0.5
    grow: float = 0.4
    tau: float = 1.0
    interval: int = 1
    mag_ratio_limit: float = 1000.0
    score: str = "l1"


class GrowingRegularization(Method):
    """Shared machinery: the pruned set, lam per unit, the gradient penalty and the stop rule."""

    needs_training = True
    needs_total_steps = True

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        if not (0 <= o.start < 1 and 0 < o.grow and o.start + o.grow + getattr(o, "pick", 0.0) <= 1):
            raise ConfigError(f"{self.name}: start + pick + grow must fit in the run (got {o})")
        if o.interval < 1:
            raise ConfigError(f"{self.name}: interval must be >= 1")
        self.lam: dict[int, torch.Tensor] = {}     # group -> lam per unit
        self.pruned: dict[int, np.ndarray] = {}    # group -> bool per unit (P), once chosen
        self.ratio_ema: dict[int, float] = {}
        self.growing = True
        self.rows: list[Rows] = []

    def prepare(self, ctx: Context) -> None:
        self.rows = producer_rows(ctx)
        self.lam = {g.id: torch.zeros(g.size) for g in ctx.graph.prunable_groups}

    # ---- the pruned set --------------------------------------------------------------------------
    def choose(self, ctx: Context, data: Any = None) -> None:
        """P: the units the budget removes, ranked by (normalised) filter magnitude."""
        keep = allocate(ctx.cost, ctx.targets, scores.group_scores(self.options.score, ctx.module, ctx.graph, data))
        self.pruned = {gid: ~mask for gid, mask in keep.items()}

    def decide(self, ctx: Context, data: Any = None) -> Decision:
        if not self.pruned:  # trained too briefly to reach the regularization: choose now
            self.choose(ctx, data)
        return Decision({gid: ~p for gid, p in self.pruned.items()})

    # ---- the penalty -----------------------------------------------------------------------------
    def after_backward(self, ctx: Context) -> None:
        self.penalize(ctx, self.rows)

    def penalize(self, ctx: Context, rows: list[Rows]) -> None:
        """``grad += lam * w`` on each row, with its unit's lam (the growing L2 penalty's gradient)."""
        with torch.no_grad():
            for r in rows:
                lam = self.lam[r.group][r.units]
                if not lam.any():
                    continue
                p = ctx.module.get_parameter(r.qualname)
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.add_(_broadcast(lam.to(p.dtype), r.dim, p.dim()) * p)

    def _magnitudes(self, ctx: Context) -> dict[int, tuple[float, float]]:
        """Per group: (mean L1 of kept filters, mean L1 of pruned filters), a unit's filters
        summed over its producers as ``fxprune.scores.l1`` does."""
        out = {}
        for gid, pruned in self.pruned.items():
            if pruned.any() and (~pruned).any():
                l1 = scores.l1(ctx.module, ctx.graph, ctx.graph.group(gid))
                out[gid] = (float(l1[~pruned].mean()), float(l1[pruned].mean()))
        return out

    def _grow(self, ctx: Context, delta: float) -> None:
        """One growth update of P's lam, unless the stop rule says the pruned set is gone."""
        for gid, (kept, pruned) in self._magnitudes(ctx).items():
            ratio = kept / max(pruned, 1e-12)
            self.ratio_ema[gid] = 0.9 * self.ratio_ema.get(gid, ratio) + 0.1 * ratio
        reached = bool(self.ratio_ema) and all(r >= self.options.mag_ratio_limit for r in self.ratio_ema.values())
        if reached or max(float(l.max()) for l in self.lam.values()) >= self.options.tau:
            self.growing = False
            return
        for gid, pruned in self.pruned.items():
            self.lam[gid][torch.as_tensor(pruned)] += delta

    def delta(self, ctx: Context, span: float, limit: float) -> float:
        """The increment that takes lam from 0 to ``limit`` over ``span`` of the run."""
        return limit * self.options.interval / max(span * ctx.total_steps, 1.0)

    def schedule(self, ctx: Context) -> dict[str, float]:
        return {"lam_max": max((float(l.max()) for l in self.lam.values()), default=0.0),
                "mag_ratio_min": min(self.ratio_ema.values(), default=0.0)}

    def state_dict(self) -> dict[str, Any]:
        return {"lam": {g: l.clone() for g, l in self.lam.items()},
                "pruned": {g: p.copy() for g, p in self.pruned.items()},
                "ratio_ema": dict(self.ratio_ema), "growing": self.growing}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lam = {int(g): l.clone() for g, l in state["lam"].items()}
        self.pruned = {int(g): np.asarray(p, bool).copy() for g, p in state["pruned"].items()}
        self.ratio_ema = {int(g): float(v) for g, v in state["ratio_ema"].items()}
        self.growing = bool(state["growing"])


@register_method
class GReg1(GrowingRegularization):
    """GReg-1: P fixed by L1 when the regularization starts; lam_P grows, then stabilizes."""

    name = "greg1"
    Options = GRegOptions

    def after_step(self, ctx: Context) -> None:
        begin = int(self.options.start * ctx.total_steps)
        if ctx.step <= begin:
            return
        if not self.pruned:
            self.choose(ctx)
        if self.growing and (ctx.step - begin) % self.options.interval == 0:
            self._grow(ctx, self.delta(ctx, self.options.grow, self.options.tau))


@dataclass(frozen=True)
class GReg2Options(GRegOptions):
    pick: float = 0.05
    pick_limit: float = 1e-2
    recover: float = -1e-4
    grow: float = 0.35


@register_method
class GReg2(GrowingRegularization):
    """GReg-2: a uniform growing penalty on every prunable filter (pick), then P by L1, then
    P's lam grows while kept filters get a small negative ``recover`` term."""

    name = "greg2"
    Options = GReg2Options

    def after_step(self, ctx: Context) -> None:
        o = self.options
        begin = int(o.start * ctx.total_steps)
        picked_at = begin + int(o.pick * ctx.total_steps)
        if ctx.step <= begin or (ctx.step - begin) % o.interval:
            return
        if ctx.step <= picked_at:
            step = self.delta(ctx, o.pick, o.pick_limit)
            for lam in self.lam.values():
                lam.add_(step).clamp_(max=o.pick_limit)
            return
        if not self.pruned:
            self.choose(ctx)
            for gid, pruned in self.pruned.items():
                self.lam[gid] = torch.where(torch.as_tensor(pruned), torch.zeros(()), torch.full((), o.recover))
        if self.growing:
            self._grow(ctx, self.delta(ctx, o.grow, o.tau))
