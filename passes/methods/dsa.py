"""DSA: Differentiable Sparsity Allocation (Ning et al., ECCV 2020), see METHODS.md §4.

The paper's (official ``models/op.py``): one keep ratio per channel group, alpha_k = sigmoid(a_k)
(a_k starts at ``init`` = 5, alpha 0.993), shared by every producer of the group, and the
differentiable pruning process:
- base importance b_i per unit from ``fxprune.scores`` (``score``: "bn_scale" = |gamma|, the
  released models' choice; "l1" = the filter norm, their "conv"; "conv_bn" = L1 * |gamma| / sigma),
  summed over the group's producers and detached;
- keep probabilities p_i = clip(sigmoid(beta2_k * (log b_i - t_k)) + 0.01, 0, 1) where the offset
  t_k = log beta1 is solved at every forward so that mean_i p_i = alpha_k (one batched bisection
  over all groups in torch, ``keep_probabilities``, where the official code calls scipy per layer);
  beta2_k is a per-group buffer, not trained (the official ``invsp_beta_2``);
- masks m_i ~ Bernoulli(p_i), one sample per forward shared by the group's producers, with the
  straight-through gradient dL/dp_i = dL/dm_i;
- the implicit gradient to alpha: from mean_i p_i(t(alpha)) = alpha, dt/dalpha = 1 / mean_i dp_i/dt,
  so dL/dalpha = C * sum_i softmax(log f'_i) dL/dp_i with f' the S-curve's slope (autograd through
  t + (alpha - sg(alpha)) / sg(mean dp/dt); a clipped unit's slope is 0, the exact derivative);
- budget: FLOPs (or parameters) as the quadratic form F(alpha) = alpha^T A alpha + B alpha + c of the
  keep fractions (the official ``PrimalComponents``; here ``CostModel.quadratic``), in units of the
  budget; decide keeps each group's top ceil(alpha_k C_k) units by b (eval mode: the same cut).

This library's choices [A] (the official repository has no training loop, METHODS.md §4). Numbers:
ResNet-20 on digits-hard at 50% FLOPs, seed 0 (a dense model trained 15 epochs, 93.3%):
- where the mask sits (``gate_past_activation``, default on): the official mask multiplies the BN
  output before the ReLU. There a dropped unit feeds ReLU(0), whose gradient is 0, and a kept one
  reports only d/dscale, about 0 at equilibrium: at alpha 0.8 the straight-through dL/dalpha of
  the nine block-internal groups averaged +0.0001 (one epoch of batches, twice) where a
  Monte-Carlo finite difference of the expected loss gave -0.36. Masking instead the output of an
  element-wise op f with f(0) = 0 that is the norm's only user (``gates_past_activations``)
  computes the same network for binary masks (f(0 * x) = 0 * f(x)) and lets a dropped unit report
  the first-order gain of bringing it back: -0.135 against -0.36, the right sign in 9 of 9 groups
  (0.14x to 0.64x the finite difference; first order underestimates removing a whole unit).
  Residual streams (producers feeding an add) keep the mask after the norm; their estimate stays
  near 0 or wrong (-0.003 and +0.11 against -1.5 and -2.1): the add's other operand hides them;
- beta2 grows linearly from ``beta2`` = 1 (the official init) to ``beta2_final`` = 20 over the
  search: the official buffer is changed by code that was not released; a steeper curve makes the
  masks less random (the variance the official docstring wants reduced) as the search ends;
- the outer update, scaled ADMM for min L(alpha) s.t. F(alpha) <= 1, after every weight step:
  a <- Adam_{alpha_lr}(dL/da + rho (alpha - z + u) dalpha/da); z <- Pi(alpha + u), the projection
  onto {z in [lo, 1]^G : F(z) <= 1} approximated as in METHODS.md by clip(v - mu grad F(v), lo, 1)
  with the smallest feasible mu (bisection); u <- u + alpha - z. rho (``rho`` = 0.01) grows by
  1 + ``rho_rate`` per 1% of the search (``AdaptiveWeight``). Per weight step, not per epoch: a
  has to travel from 5 to about 0 within the short runs this library is tested with. Two changes
  let the search itself end on the budget: ``dual_reset`` (z = alpha, u = 0 while alpha is
  feasible) and Adam's memory on a shortened to betas (0.5, 0.9) (``ADAM_BETAS``). With torch's
  (0.9, 0.999) Adam carries the penalty's push past the budget and then scales the task gradient
  by the penalty's old magnitudes. From the trained model, 4 epochs of search, F(alpha)/budget at
  the end: 0.996 (decide +0 / -4 of 448 units); default betas 0.69 (+45); plain ADMM (no reset)
  0.19 with default betas (+166) and 0.32 with short ones (+119); the previous code 0.49 (+87).
  From scratch, 8 epochs: 0.994 (-5 units);
- alpha stays in [lo_k, 1], lo_k = max(1 / C_k, 0.02): a group keeps one unit;
- decide rounds the cut to the exact budget with ``fxprune.budget.allocate`` (units ranked by
  their distance to their group's cut); ``report()`` says how far the search itself ended from the
  budget (``budget_fraction_of_alpha``, before any rounding) and how many units the rounding added
  to and removed from the search's own top-ceil(alpha C) cut (``decide_added``, ``decide_removed``);
- ``warmup``: a first fraction of the steps trained dense (the library's; the paper starts from
  scratch: 0, the default);
- the Bernoulli samples come from the method's own generator (``seed``), saved in its state.
The norms' running statistics, trained under random masks, go stale once units leave: pass
``compile(..., bn_recalibration=N)`` (``fxprune.passes.reestimate``), as for every method
(above, before fine-tuning: 11.7% raw, 77.2% re-estimated from the trained model; 10.3 / 57.2%
from scratch).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from fxprune import scores
from fxprune.budget import allocate
from fxprune.decision import Decision
from fxprune.errors import ConfigError
from fxprune.ir import ChannelGroup
from fxprune.method import Context, register_method
from fxprune.passes.gates import Gate, gate_sites
from fxprune.passes.methods.gated import GateMethod
from fxprune.rules import Category, rule_for
from fxprune.schedules import AdaptiveWeight, linear_path, progress

FLOOR = 0.01  # the S-curve's floor: every unit keeps some chance during the search
SCORES = ("bn_scale", "l1", "conv_bn")
ADAM_BETAS = (0.5, 0.9)  # Adam's memory on a: short, so that alpha settles on the budget (module docstring)


@dataclass(frozen=True)
class DSAOptions:
    score: str = "bn_scale"  # base importance (fxprune.scores): bn_scale, l1, conv_bn
    init: float = 5.0  # a_k at the start: alpha = sigmoid(5) = 0.993
    beta2: float = 1.0  # steepness of the S-curve at the start of the search (the official init)
    beta2_final: float = 20.0  # ... and at its end (linear in between)
    alpha_lr: float = 0.05  # Adam's rate on a, one outer update per weight step
    rho: float = 0.01  # ADMM penalty weight at the start of the search
    rho_rate: float = 0.05  # rho grows by 1 + rho_rate per 1% of the search
    warmup: float = 0.0  # fraction of the steps trained dense before the search
    dual_reset: bool = True  # z = alpha, u = 0 while alpha is feasible (the library's, see above)
    gate_past_activation: bool = True  # mask the output of a zero-preserving activation after the norm
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


def _curve(log_b: torch.Tensor, t: torch.Tensor, beta2: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(beta2[:, None] * (log_b - t[:, None])) + FLOOR, max=1.0)


def solve_offset(log_b: torch.Tensor, valid: torch.Tensor, alpha: torch.Tensor, beta2: torch.Tensor,
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


def keep_probabilities(log_b: torch.Tensor, valid: torch.Tensor, alpha: torch.Tensor,
                       beta2: torch.Tensor | float) -> torch.Tensor:
    """p [G, Cmax] (0 where not ``valid``) with mean p_k = alpha_k, differentiable in ``alpha``
    through the implicit function t(alpha); ``beta2`` per row or one for all. Raises nothing."""
    beta2 = torch.as_tensor(beta2, dtype=log_b.dtype).expand(len(log_b))
    t = solve_offset(log_b, valid, alpha.detach(), beta2)
    n = valid.sum(1)
    with torch.no_grad():
        s = torch.sigmoid(beta2[:, None] * (log_b - t[:, None]))
        slope = torch.where(valid & (s + FLOOR < 1.0), -beta2[:, None] * s * (1 - s), torch.zeros_like(s)).sum(1) / n
    ok = slope < -1e-12
    shift = (alpha - alpha.detach()) / torch.where(ok, slope, -torch.ones_like(slope))
    p = _curve(log_b, t + shift, beta2)
    p = torch.where(ok[:, None], p, p.detach() + (alpha - alpha.detach())[:, None])  # all clipped: spread evenly
    return p * valid


def _keeps_zero(node: fx.Node, x: fx.Node, modules: dict[str, torch.nn.Module]) -> bool:
    """Whether ``node`` is an element-wise op of ``x`` alone with f(0) = 0 (run on a zero per channel)."""
    rule = rule_for(node, modules)
    shape = getattr(x.args[0].meta.get("fxprune_value"), "shape", None)
    if rule is None or rule.category is not Category.POINTWISE or node.all_input_nodes != [x] \
            or not node.args or node.args[0] is not x or shape is None or len(shape) < 2:
        return False
    zero = torch.zeros([1, shape[1]] + [1] * (len(shape) - 2))
    try:
        with torch.no_grad():
            if node.op == "call_module":
                out = modules[node.target](zero, *node.args[1:], **node.kwargs)
            elif node.op == "call_method":
                out = getattr(zero, node.target)(*node.args[1:], **node.kwargs)
            else:
                out = node.target(zero, *node.args[1:], **node.kwargs)
    except Exception:  # noqa: BLE001 - an op that cannot run on a zero is not moved past
        return False
    return isinstance(out, torch.Tensor) and out.shape == zero.shape and not bool(out.any())


def gates_past_activations(gm: fx.GraphModule) -> int:
    """Move every gate of ``gm`` past the zero-preserving element-wise ops that are its only user
    (BN -> gate -> ReLU becomes BN -> ReLU -> gate), in place; returns the number of moves. For
    binary gates the module computes the same; the gate's gradient then reads the unit's output."""
    modules, moved, changed = dict(gm.named_modules()), 0, True
    while changed:
        changed = False
        for gate in gate_sites(gm):
            users = list(gate.users)
            if len(users) == 1 and _keeps_zero(users[0], gate, modules):
                f = users[0]
                f.replace_all_uses_with(gate)
                f.replace_input_with(gate, gate.args[0])
                gate.update_arg(0, f)
                f.append(gate)
                moved, changed = moved + 1, True
    gm.graph.lint()
    gm.recompile()
    return moved


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
        if not 0 <= o.warmup < 1 or o.beta2 <= 0 or o.beta2_final <= 0 or o.alpha_lr <= 0 or o.rho <= 0 \
                or o.rho_rate < 0:
            raise ConfigError(f"method 'dsa': need 0 <= warmup < 1, positive beta2, beta2_final, alpha_lr, rho and "
                              f"rho_rate >= 0; got warmup={o.warmup}, beta2={o.beta2}, beta2_final={o.beta2_final}, "
                              f"alpha_lr={o.alpha_lr}, rho={o.rho}, rho_rate={o.rho_rate}")
        self.order: list[int] = []
        self.logits = torch.zeros(0, dtype=torch.float64)  # a_k per group, in ``order``
        self.beta2 = torch.zeros(0, dtype=torch.float64)  # beta2_k per group (a buffer: set, not trained)
        self.lo = torch.zeros(0, dtype=torch.float64)
        self.form: tuple[torch.Tensor, torch.Tensor, float] | None = None
        self.z = torch.zeros(0, dtype=torch.float64)
        self.u = torch.zeros(0, dtype=torch.float64)
        self.rho: AdaptiveWeight | None = None
        self.opt: torch.optim.Adam | None = None
        self.generator = torch.Generator().manual_seed(o.seed)
        self.importance: dict[int, np.ndarray] = {}
        self.moved = 0
        self.changed = {"decide_added": 0, "decide_removed": 0}

    def make_gate(self, group: ChannelGroup) -> Gate:
        return DSAGate(group.size, group.id)

    # ---- setup -------------------------------------------------------------------------------
    def prepare(self, ctx: Context) -> None:
        super().prepare(ctx)
        o = self.options
        self.moved = gates_past_activations(ctx.module) if o.gate_past_activation else 0
        self.order = sorted(self.gates)
        self.logits = torch.full((len(self.order),), float(o.init), dtype=torch.float64, requires_grad=True)
        self.beta2 = torch.full((len(self.order),), float(o.beta2), dtype=torch.float64)
        self.lo = torch.tensor([max(1.0 / self.gates[g].units, 0.02) for g in self.order], dtype=torch.float64)
        name = ctx.targets.primary  # flops or params: the flow refuses budgets outside ``resources``
        a, b, c = ctx.cost.quadratic(name, self.order)
        limit = float(ctx.targets.limits[name])
        self.form = (torch.as_tensor(a / limit), torch.as_tensor(b / limit), c / limit)
        self.z = self.alphas().detach().clone()
        self.u = torch.zeros_like(self.z)
        self.rho = AdaptiveWeight(o.rho, o.rho_rate, max(1, self.search_steps(ctx)))
        self.opt = torch.optim.Adam([self.logits], lr=o.alpha_lr, betas=ADAM_BETAS)
        ctx.module.register_forward_pre_hook(lambda module, args: self.sample(ctx, module.training, _device(args)))

    def parameters(self, ctx: Context) -> list[torch.nn.Parameter]:
        return []  # a is moved by the outer update only

    def warmup_steps(self, ctx: Context) -> int:
        """Steps trained dense before the search: the search's steps are the ones after them."""
        return round((ctx.total_steps or 0) * self.options.warmup)

    def search_steps(self, ctx: Context) -> int:
        return (ctx.total_steps or 0) - self.warmup_steps(ctx)

    def alphas(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    def refresh_importance(self, ctx: Context) -> None:
        self.importance = {g.id: scores.score(self.options.score, ctx.traced, ctx.graph, g)
                           for g in ctx.graph.prunable_groups if g.id in self.gates}

    def probabilities(self) -> torch.Tensor:
        """Keep probabilities [G, Cmax] from the current importances, alphas and beta2 (with the
        implicit gradient to the alphas)."""
        width = max(len(v) for v in self.importance.values())
        log_b = torch.zeros(len(self.order), width, dtype=torch.float64)
        valid = torch.zeros(len(self.order), width, dtype=torch.bool)
        for k, gid in enumerate(self.order):
            b = torch.as_tensor(self.importance[gid], dtype=torch.float64)
            log_b[k, : len(b)] = b.clamp_min(1e-12).log()
            valid[k, : len(b)] = True
        return keep_probabilities(log_b, valid, self.alphas(), self.beta2)

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
        if training and ctx.step < self.warmup_steps(ctx):
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
        lo, hi = 0.0, float(((v - self.lo) / grad.clamp_min(1e-12)).max())
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.flops(torch.maximum(v - mid * grad, self.lo)) > 1 else (lo, mid)
        return torch.maximum(v - hi * grad, self.lo)

    def after_step(self, ctx: Context) -> None:
        if ctx.step <= self.warmup_steps(ctx):  # the step just taken was dense
            self.logits.grad = None
            return
        o = self.options
        penalty = self.rho.value / 2 * ((self.alphas() - self.z + self.u) ** 2).sum()
        penalty.backward()  # adds to the task gradient the step's backward left on a
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.logits.copy_(torch.maximum(torch.log(self.lo / (1 - self.lo)), self.logits).clamp(max=10.0))
            alpha = self.alphas()
            if o.dual_reset and self.flops(alpha) <= 1:  # the constraint is inactive: nothing for the dual to integrate
                self.z, self.u = alpha.clone(), torch.zeros_like(self.u)
            else:
                self.z = self.project(alpha + self.u)
                self.u = self.u + alpha - self.z
            done = progress(ctx.step, self.warmup_steps(ctx), self.search_steps(ctx))
            self.beta2.fill_(linear_path(o.beta2, o.beta2_final, done))
        self.rho.update(grow=True)

    # ---- state and decision ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.opt is None:
            return {}
        return {"logits": self.logits.detach().clone(), "opt": self.opt.state_dict(), "z": self.z.clone(),
                "u": self.u.clone(), "rho": self.rho.value, "beta2": self.beta2.clone(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            with torch.no_grad():
                self.logits.copy_(state["logits"])
            self.opt.load_state_dict(state["opt"])
            self.z, self.u, self.beta2 = state["z"].clone(), state["u"].clone(), state["beta2"].clone()
            self.rho.value = float(state["rho"])
            self.generator.set_state(state["generator"])

    def decide(self, ctx: Context, data: Any = None) -> Decision:
        """The cut rounded to the exact budget by the allocator; records how many units that
        rounding added to and removed from the search's own cut."""
        self.refresh_importance(ctx)
        alphas, ranks, cut = self.alphas().detach().numpy(), self.ranks(), self.cut()
        ranking = {gid: alphas[k] - (ranks[gid] + 0.5) / len(ranks[gid])  # > 0 inside the group's cut
                   for k, gid in enumerate(self.order)}
        decision = Decision(allocate(ctx.cost, ctx.targets, ranking))
        self.changed = {"decide_added": int(sum((decision.keep[g] & ~cut[g]).sum() for g in cut)),
                        "decide_removed": int(sum((cut[g] & ~decision.keep[g]).sum() for g in cut))}
        return decision

    def schedule(self, ctx: Context) -> dict[str, float]:
        with torch.no_grad():
            alpha = self.alphas()
            return {"alpha": float(alpha.mean()), "rho": self.rho.value, "beta2": float(self.beta2.mean()),
                    "F(alpha)": float(self.flops(alpha)), "F(z)": float(self.flops(self.z))}

    def report(self, ctx: Context) -> dict[str, Any]:
        with torch.no_grad():
            alpha = self.alphas()
            return {"alpha": {str(g): round(float(a), 4) for g, a in zip(self.order, alpha)},
                    "budget_fraction_of_alpha": float(self.flops(alpha)), "rho": self.rho.value,
                    "beta2": float(self.beta2.mean()), "gates_past_activation": self.moved, **self.changed}


def _device(args: tuple[Any, ...]) -> torch.device | None:
    """The device of a forward's first tensor argument (where the masks must live)."""
    return next((a.device for a in args if isinstance(a, torch.Tensor)), None)
