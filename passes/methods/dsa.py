"""DSA: Differentiable Sparsity Allocation (Ning et al., ECCV 2020), see METHODS.md §4.

One keep ratio per channel group, alpha_k = sigmoid(a_k) (a_k starts at ``init`` = 5, alpha 0.993),
shared by every producer of the group. The differentiable pruning process (official ``op.py``):
- base importance b_i per unit from ``fxprune.scores`` (``score``: "bn_scale" = |gamma|, the
  released models' choice; "l1" = the filter norm, their "conv"; "conv_bn" = L1 * |gamma| / sigma),
  summed over the group's producers and detached;
- keep probabilities p_i = clip(sigmoid(beta2 * (log b_i - t_k)) + 0.01, 0, 1) where the offset
  t_k = log beta1 is solved at every forward so that mean_i p_i = alpha_k: one batched bisection
  over all groups in torch (``keep_probabilities``), where the official code calls scipy per layer;
- masks m_i ~ Bernoulli(p_i), one sample per forward shared by all the group's producers, applied
  after the producers' norm, with the straight-through gradient dL/dp_i = dL/dm_i;
- the implicit gradient to alpha: differentiating mean_i p_i(t(alpha)) = alpha gives
  dt/dalpha = 1 / mean_i dp_i/dt, so dL/dalpha = C * sum_i softmax(log f'_i) dL/dp_i with f' the
  S-curve's slope: the paper's formula, obtained here by autograd through t + (alpha - sg(alpha)) /
  sg(mean dp/dt). Where the clip holds, a unit's slope is 0 (the exact derivative; the official
  backward ignores the clip).
In eval mode the masks are deterministic: each group's top ceil(alpha_k C_k) units by b.

Budget: the primary resource (MACs or parameters) as the quadratic form F(alpha) = alpha^T A alpha +
B alpha + c of the per-group keep fractions, read from the shared cost model
(``CostModel.quadratic``), in units of the budget. Outer update after every weight step (scaled
ADMM for min L(alpha) s.t. F(alpha) <= 1):
  1. a <- a - Adam(dL/da + rho * (alpha - z + u) * dalpha/da), with dL/da the task gradient the
     step's backward left on a;
  2. z <- Pi(alpha + u), the projection onto {z in [lo, 1]^G : F(z) <= 1}, approximated as in
     METHODS.md by z(mu) = clip(v - mu * grad F(v), lo, 1) with the smallest mu that fits (bisection);
  3. u <- u + alpha - z; rho grows by 1 + ``rho_rate`` per 1% of training.
  Where alpha itself is feasible (F(alpha) <= 1) the constraint is inactive: z = alpha, u = 0.
Decide: rank units by b within each group; the top ceil(alpha_k C_k) form the search's choice, and
``fxprune.budget.allocate`` rounds it to the exact budget (units ranked by their distance to
their group's cut: it trims the ones nearest the cut when the ceilings overshoot, and adds the
next ones when the search ended under the budget). Given calibration data (``compile`` passes its
``calib_loader``, else the training loader), the norms' running statistics are then re-estimated
under the decided masks (``recalibrate``).

Two modes, the same mechanism: from a trained model (pass it; ``warmup`` = 0, the default, masks
from the first step), or from scratch, the paper's headline (pass an untrained model). From
scratch every BN gamma starts equal, so every p_i equals alpha_k and the masks are uniformly
random until the gammas spread; ``warmup`` > 0 trains that fraction of the steps dense first.

Choices that are this library's [A] (the official repository has no outer loop, METHODS.md §4):
- one ADMM update per weight step, not per epoch, with Adam's rate ``alpha_lr`` = 0.05 on a:
  a has to travel from 5 to about 0 (alpha 0.5) or -2 (0.1) within the run, which per-epoch steps
  of 1e-2 cannot do in the short runs this library is tested with;
- rho starts at ``rho`` = 0.01 and grows 5% per 1% of training (the default's 5% per epoch over
  a 100-epoch run);
- the dual reset where alpha is feasible: the scaled dual integrates the violation while alpha
  is above the budget and, with one gradient step per update, keeps pushing long after alpha
  crossed it: on the methods benchmark (ResNet-20, digits-hard) the searches ended with F(alpha)
  at 4.5% of a 50% FLOPs budget from scratch and 24% after a dense warm-up
  (benchmarks/results/methods_dsa_v1.md);
- alpha stays in [lo_k, 1] with lo_k = max(1 / C_k, 0.02): a group keeps one unit, and the 0.01
  floor of the S-curve leaves mean p >= 0.01 anyway;
- the running statistics re-estimated after decide (``RECALIBRATE`` batches): the search trains
  the norms under random masks; on a validation run the pruned model scored 10% before fine-tuning
  without this and 55% with it;
- the Bernoulli samples come from the method's own generator (``seed``), saved in its state, so a
  resumed search draws the same masks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from fxprune import checks, scores
from fxprune.budget import allocate
from fxprune.decision import Decision
from fxprune.errors import ConfigError
from fxprune.ir import ChannelGroup
from fxprune.method import Context, register_method
from fxprune.passes.gates import Gate
from fxprune.passes.methods.gated import GateMethod

FLOOR = 0.01  # the S-curve's floor: every unit keeps some chance during the search
RECALIBRATE = 20  # batches that re-estimate the norms' statistics under the decided masks
SCORES = ("bn_scale", "l1", "conv_bn")


@dataclass(frozen=True)
class DSAOptions:
    score: str = "bn_scale"  # base importance (fxprune.scores): bn_scale, l1, conv_bn
    init: float = 5.0  # a_k at the start: alpha = sigmoid(5) = 0.993
    beta2: float = 1.0  # steepness of the S-curve
    alpha_lr: float = 0.05  # Adam's rate on a, one outer update per weight step
    rho: float = 0.01  # ADMM penalty weight at the start of the search
    rho_rate: float = 0.05  # rho grows by 1 + rho_rate per 1% of training
    warmup: float = 0.0  # fraction of the steps trained dense before the search (from scratch)
    seed: int = 0  # seed of the Bernoulli masks' generator


class DSAGate(Gate):
    """The group's mask of the current forward, set by the method before each forward. The gate
    holds no parameter: a_k lives in the method (``DSA.logits``), which the weight optimizer must
    not train and a device move of the module must not replace."""

    def __init__(self, size: int, group_id: int) -> None:
        super().__init__(size, group_id)
        del self.weight
        self.units = size
        self.current: torch.Tensor | None = None

    def values(self) -> torch.Tensor:
        return self.current if self.current is not None else torch.ones(self.units)


def _curve(log_b: torch.Tensor, t: torch.Tensor, beta2: float) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(beta2 * (log_b - t[:, None])) + FLOOR, max=1.0)


def solve_offset(log_b: torch.Tensor, valid: torch.Tensor, alpha: torch.Tensor, beta2: float,
                 iters: int = 64) -> torch.Tensor:
    """Per row k the offset t_k with mean over the valid units of _curve(log_b, t) = alpha_k:
    bisection on all rows at once (the mean falls as t grows). Raises nothing."""
    with torch.no_grad():
        n = valid.sum(1)
        lo = log_b.masked_fill(~valid, math.inf).amin(1) - 40.0 / beta2
        hi = log_b.masked_fill(~valid, -math.inf).amax(1) + 40.0 / beta2
        for _ in range(iters):
            mid = (lo + hi) / 2
            above = (_curve(log_b, mid, beta2) * valid).sum(1) / n > alpha
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        return (lo + hi) / 2


def keep_probabilities(log_b: torch.Tensor, valid: torch.Tensor, alpha: torch.Tensor, beta2: float) -> torch.Tensor:
    """p [G, Cmax] (0 where not ``valid``) with mean p_k = alpha_k, differentiable in ``alpha``
    through the implicit function t(alpha). Raises nothing."""
    t = solve_offset(log_b, valid, alpha.detach(), beta2)
    n = valid.sum(1)
    with torch.no_grad():
        s = torch.sigmoid(beta2 * (log_b - t[:, None]))
        slope = torch.where(valid & (s + FLOOR < 1.0), -beta2 * s * (1 - s), torch.zeros_like(s)).sum(1) / n
    ok = slope < -1e-12
    shift = (alpha - alpha.detach()) / torch.where(ok, slope, -torch.ones_like(slope))
    p = _curve(log_b, t + shift, beta2)
    p = torch.where(ok[:, None], p, p.detach() + (alpha - alpha.detach())[:, None])  # all clipped: spread evenly
    return p * valid


@register_method
class DSA(GateMethod):
    """Per-group keep ratios searched by gradient under an ADMM budget, masks sampled by importance."""

    name = "dsa"
    Options = DSAOptions
    needs_training = True
    needs_total_steps = True
    resources = ("macs", "params")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        if o.score not in SCORES:
            raise ConfigError(f"method 'dsa': score={o.score!r}; the base importances DSA defines: {', '.join(SCORES)}")
        if not 0 <= o.warmup < 1 or o.beta2 <= 0 or o.alpha_lr <= 0 or o.rho <= 0 or o.rho_rate < 0:
            raise ConfigError(f"method 'dsa': need 0 <= warmup < 1 and positive beta2, alpha_lr, rho (rho_rate >= 0); "
                              f"got warmup={o.warmup}, beta2={o.beta2}, alpha_lr={o.alpha_lr}, rho={o.rho}, "
                              f"rho_rate={o.rho_rate}")
        self.order: list[int] = []
        self.logits = torch.zeros(0, dtype=torch.float64)  # a_k per group, in ``order``
        self.lo = torch.zeros(0, dtype=torch.float64)
        self.form: tuple[torch.Tensor, torch.Tensor, float] | None = None
        self.z = torch.zeros(0, dtype=torch.float64)
        self.u = torch.zeros(0, dtype=torch.float64)
        self.rho = o.rho
        self.opt: torch.optim.Adam | None = None
        self.generator = torch.Generator().manual_seed(o.seed)
        self.importance: dict[int, np.ndarray] = {}
        self.holding = False  # masks held as they are (recalibration under the decision)
        self.recalibrated = 0

    def make_gate(self, group: ChannelGroup) -> Gate:
        return DSAGate(group.size, group.id)

    # ---- setup -------------------------------------------------------------------------------
    def prepare(self, ctx: Context) -> None:
        super().prepare(ctx)
        self.order = sorted(self.gates)
        self.logits = torch.full((len(self.order),), float(self.options.init), dtype=torch.float64, requires_grad=True)
        sizes = [self.gates[g].units for g in self.order]
        self.lo = torch.tensor([max(1.0 / c, 0.02) for c in sizes], dtype=torch.float64)
        name = ctx.targets.primary  # flops or params: the flow refuses budgets outside ``resources``
        a, b, c = ctx.cost.quadratic(name, self.order)
        limit = float(ctx.targets.limits[name])
        self.form = (torch.as_tensor(a / limit), torch.as_tensor(b / limit), c / limit)
        self.z = self.alphas().detach().clone()
        self.u = torch.zeros_like(self.z)
        self.opt = torch.optim.Adam([self.logits], lr=self.options.alpha_lr)
        ctx.module.register_forward_pre_hook(lambda module, args: self.sample(ctx, module.training, _device(args)))

    def parameters(self, ctx: Context) -> list[torch.nn.Parameter]:
        return []  # a is moved by the outer update only

    def alphas(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    def searching(self, ctx: Context) -> bool:
        return ctx.progress >= self.options.warmup

    def refresh_importance(self, ctx: Context) -> None:
        self.importance = {g.id: scores.score(self.options.score, ctx.traced, ctx.graph, g)
                           for g in ctx.graph.prunable_groups if g.id in self.gates}

    def probabilities(self) -> torch.Tensor:
        """Keep probabilities [G, Cmax] from the current importances and alphas (with the implicit
        gradient to the alphas)."""
        width = max(len(v) for v in self.importance.values())
        log_b = torch.zeros(len(self.order), width, dtype=torch.float64)
        valid = torch.zeros(len(self.order), width, dtype=torch.bool)
        for k, gid in enumerate(self.order):
            b = torch.as_tensor(self.importance[gid], dtype=torch.float64)
            log_b[k, : len(b)] = b.clamp_min(1e-12).log()
            valid[k, : len(b)] = True
        return keep_probabilities(log_b, valid, self.alphas(), self.options.beta2)

    def ranks(self) -> dict[int, np.ndarray]:
        """Each unit's place in its group by importance (0: the most important)."""
        out = {}
        for gid, b in self.importance.items():
            rank = np.empty(len(b))
            rank[np.argsort(-b, kind="stable")] = np.arange(len(b))
            out[gid] = rank
        return out

    def cut(self) -> dict[int, np.ndarray]:
        """The search's choice: each group's top ceil(alpha_k C_k) units by importance."""
        alphas, ranks = self.alphas().detach().numpy(), self.ranks()
        return {gid: ranks[gid] < max(1, math.ceil(alphas[k] * len(ranks[gid]) - 1e-9))
                for k, gid in enumerate(self.order)}

    def sample(self, ctx: Context, training: bool, device: torch.device | None = None) -> None:
        """Before each forward: fresh importances, then every gate's mask on ``device`` (Bernoulli
        with the straight-through gradient while searching in training mode; the top-ceil(alpha C)
        cut in eval mode; all ones during the dense warmup)."""
        if self.holding:
            return
        if training and not self.searching(ctx):
            for gate in self.gates.values():
                gate.current = torch.ones(gate.units, device=device)
            return
        self.refresh_importance(ctx)
        if not training:
            for gid, mask in self.cut().items():
                self.gates[gid].current = torch.as_tensor(mask, dtype=torch.float32, device=device)
            return
        p = self.probabilities()
        drawn = torch.bernoulli(p.detach(), generator=self.generator)
        masks = (drawn + p - p.detach()).float().to(device)
        for k, gid in enumerate(self.order):
            self.gates[gid].current = masks[k, : self.gates[gid].units]

    # ---- the outer (ADMM) update -------------------------------------------------------------
    def flops(self, alpha: torch.Tensor) -> torch.Tensor:
        """The primary resource of per-group keep fractions, in units of the budget."""
        a, b, c = self.form
        return alpha @ a @ alpha + b @ alpha + c

    def project(self, v: torch.Tensor) -> torch.Tensor:
        """z(mu) = clip(v - mu grad F(v), lo, 1) with the smallest mu where F(z) <= 1 (bisection)."""
        v = torch.maximum(torch.minimum(v, torch.ones_like(v)), self.lo)
        if self.flops(v) <= 1:
            return v
        a, b, _ = self.form
        grad = 2 * a @ v + b
        room = (v - self.lo) / grad.clamp_min(1e-12)
        lo, hi = 0.0, float(room.max())
        for _ in range(60):
            mid = (lo + hi) / 2
            z = torch.maximum(v - mid * grad, self.lo)
            lo, hi = (mid, hi) if self.flops(z) > 1 else (lo, mid)
        return torch.maximum(v - hi * grad, self.lo)

    def after_step(self, ctx: Context) -> None:
        if not self.searching(ctx):
            self.logits.grad = None
            return
        alpha = self.alphas()
        penalty = self.rho / 2 * ((alpha - self.z + self.u) ** 2).sum()
        penalty.backward()  # adds to the task gradient the step's backward left on a
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.logits.copy_(torch.maximum(torch.log(self.lo / (1 - self.lo)), self.logits).clamp(max=10.0))
            alpha = self.alphas()
            if self.flops(alpha) <= 1:  # the constraint is inactive: nothing left for the dual to integrate
                self.z, self.u = alpha.clone(), torch.zeros_like(self.u)
            else:
                self.z = self.project(alpha + self.u)
                self.u = self.u + alpha - self.z
        if ctx.total_steps:
            self.rho *= (1 + self.options.rho_rate) ** (100 / ctx.total_steps)

    # ---- state and decision ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.opt is None:
            return {}
        return {"logits": self.logits.detach().clone(), "opt": self.opt.state_dict(), "z": self.z.clone(),
                "u": self.u.clone(), "rho": self.rho, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            with torch.no_grad():
                self.logits.copy_(state["logits"])
            self.opt.load_state_dict(state["opt"])
            self.z, self.u, self.rho = state["z"].clone(), state["u"].clone(), float(state["rho"])
            self.generator.set_state(state["generator"])

    def decide(self, ctx: Context, data: Any = None) -> Decision:
        """The cut rounded to the exact budget by the allocator; with ``data``, the norms' running
        statistics are then re-estimated under the decided masks (``recalibrate``)."""
        self.refresh_importance(ctx)
        alphas, ranks = self.alphas().detach().numpy(), self.ranks()
        ranking = {gid: alphas[k] - (ranks[gid] + 0.5) / len(ranks[gid])  # > 0 inside the group's cut
                   for k, gid in enumerate(self.order)}
        decision = Decision(allocate(ctx.cost, ctx.targets, ranking))
        self.recalibrated = self.recalibrate(ctx, decision.keep, data) if data is not None else 0
        return decision

    def recalibrate(self, ctx: Context, keep: dict[int, np.ndarray], data: Any) -> int:
        """Running statistics of every batch norm re-estimated over ``RECALIBRATE`` batches of
        ``data`` with the decided masks held (no gradient, weights unchanged); returns the number of
        batches read. The search trained them under random masks, and the binarized network's
        activations have other statistics (this library's addition [A], see the module docstring).
        Raises ``ConfigError`` for malformed batches (``fxprune.checks.batch``)."""
        norms = [m for m in ctx.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                 and m.track_running_stats]
        momenta = [m.momentum for m in norms]
        device = next((t.device for t in ctx.module.parameters()), None)
        for gid, mask in keep.items():
            if gid in self.gates:
                self.gates[gid].current = torch.as_tensor(mask, dtype=torch.float32, device=device)
        was_training, self.holding, n = ctx.module.training, True, 0
        try:
            for m in norms:
                m.reset_running_stats()
                m.momentum = None  # a cumulative average over the batches read
            ctx.module.train()
            with torch.no_grad():
                for x, _ in checks.batches(data, RECALIBRATE, "dsa's calibration data"):
                    ctx.module(x)
                    n += 1
        finally:
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum
            ctx.module.train(was_training)
            self.holding = False
        return n

    def schedule(self, ctx: Context) -> dict[str, float]:
        with torch.no_grad():
            alpha = self.alphas()
            return {"alpha": float(alpha.mean()), "rho": self.rho, "F(alpha)": float(self.flops(alpha)),
                    "F(z)": float(self.flops(self.z))}

    def report(self, ctx: Context) -> dict[str, Any]:
        with torch.no_grad():
            alpha = self.alphas()
            return {"alpha": {str(g): round(float(a), 4) for g, a in zip(self.order, alpha)},
                    "budget_fraction_of_alpha": float(self.flops(alpha)), "rho": self.rho,
                    "recalibration_batches": self.recalibrated}


def _device(args: tuple[Any, ...]) -> torch.device | None:
    """The device of a forward's first tensor argument (where the masks must live)."""
    return next((a.device for a in args if isinstance(a, torch.Tensor)), None)
