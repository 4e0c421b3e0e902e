"""greg1w: GReg-1 on single weights (official ``--wg weight``, the paper's unstructured Table 4).

The mechanism and schedule are ``greg1``'s (see ``fxprune.passes.methods.greg``): when the
regularization starts, P is the set of weights the sparsity budget removes, ranked by magnitude
(one threshold for ``Budget(scope="global")``, the same fraction per layer for ``"layer"``); every
``interval`` official iterations P's lam grows by ``delta`` up to ``tau``, until every layer's
kept/pruned mean-|w| ratio (EMA 0.9 per update) reaches ``mag_ratio_limit``; then lam stays
(stabilize) and ``decide`` masks P. The official iteration counts are laid over the run with
``fxprune.schedules.Clock``, and each step applies the penalty of its iterations as the official
per-iteration factor repeated, ``w_P *= (1 - lr_prune * lam) ** per_step``. The masks stay open
while P shrinks (P's weights train like the rest); P is fixed once chosen (GReg-1). N:M budgets
are not offered: the paper regularizes toward an unstructured mask.
"""
from __future__ import annotations

from typing import Any

import torch

from fxprune.decision import Decision
from fxprune.method import Context, register_method
from fxprune.passes.methods.greg import GRegSchedule, check_schedule
from fxprune.passes.methods.sparse import WeightMethod
from fxprune.schedules import Clock


@register_method
class GReg1Weights(WeightMethod):
    """GReg-1's growing L2 penalty on the weights a sparsity budget removes, then their masks."""

    name = "greg1w"
    Options = GRegSchedule
    budgets = ("sparsity",)
    needs_training = True
    needs_total_steps = True

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        check_schedule(self.name, self.options)
        self.pruned: dict[str, torch.Tensor] = {}  # weight -> bool per element (P)
        self.lam, self.events_done, self.integrated = 0.0, 0, 0.0
        self.ratio_ema: dict[str, float] = {}
        self.phase = "train"
        self.begin, self.clock = 0, Clock(1.0, 1)

    def start(self, ctx: Context) -> None:
        o = self.options
        self.begin = int(o.start * ctx.total_steps)
        self.clock = Clock(o.interval * o.tau / o.delta + o.stabilize, max(ctx.total_steps - self.begin, 1))

    def choose(self, ctx: Context) -> None:
        keep = self.masks_at(ctx, self.final(ctx), self.scores(ctx))
        self.pruned = {name: ~k for name, k in keep.items()}

    def after_backward(self, ctx: Context) -> None:
        """Masks stay open until ``decide``: nothing to hold at 0."""

    def after_step(self, ctx: Context) -> None:
        step = ctx.step - self.begin
        if step <= 0:
            return
        o = self.options
        if not self.pruned:
            self.choose(ctx)
            self.phase = "grow"
        events = self.clock.events(step, o.interval)
        if self.phase == "grow" and events:
            self.events_done += events
            self.lam = min(self.events_done * o.delta, o.tau)
        n = self.clock.per_step
        factor = (1 - o.lr_prune * self.lam) ** n
        with torch.no_grad():
            for name, pruned in self.pruned.items():
                p = self.masks[name].param
                p.mul_(torch.where(pruned, torch.full((), factor, dtype=p.dtype), torch.ones((), dtype=p.dtype)))
        if self.phase == "grow" and events:
            keep = 0.9 ** events
            for name, ratio in self.ratios().items():
                self.ratio_ema[name] = keep * self.ratio_ema.get(name, ratio) + (1 - keep) * ratio
            ratios = self.ratio_ema.values()
            if self.lam >= o.tau or (ratios and all(r >= o.mag_ratio_limit for r in ratios)):
                self.phase = "stabilize"
        self.integrated += o.lr_prune * self.lam * n

    def ratios(self) -> dict[str, float]:
        """Per weight tensor: mean |w| of kept over mean |w| of pruned elements."""
        out = {}
        for name, pruned in self.pruned.items():
            if pruned.any() and (~pruned).any():
                w = self.masks[name].param.detach().abs()
                out[name] = float(w[~pruned].mean()) / max(float(w[pruned].mean()), 1e-30)
        return out

    def decide(self, ctx: Context, data: Any = None) -> Decision:
        if not self.pruned:  # trained too briefly to reach the regularization: choose now
            self.choose(ctx)
        self.install(ctx, {name: ~p for name, p in self.pruned.items()})
        self.applied = self.final(ctx)
        return Decision({}, weight_masks={name: wm.mask.clone() for name, wm in self.masks.items()})

    def schedule(self, ctx: Context) -> dict[str, float]:
        return {**super().schedule(ctx), "lam": self.lam, "integrated_lr_lam": self.integrated}

    def report(self, ctx: Context) -> dict[str, Any]:
        now = self.ratios()
        return {"mag_ratio_min": min(now.values(), default=None), "integrated_lr_lam": self.integrated,
                "lam": self.lam, "phase": self.phase, "official_iterations_per_step": self.clock.per_step}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "pruned": {k: v.clone() for k, v in self.pruned.items()}, "lam": self.lam,
                "events_done": self.events_done, "integrated": self.integrated, "ratio_ema": dict(self.ratio_ema),
                "phase": self.phase}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.pruned = {k: v.clone().bool() for k, v in state["pruned"].items()}
        self.lam, self.events_done = float(state["lam"]), int(state["events_done"])
        self.integrated, self.phase = float(state["integrated"]), str(state["phase"])
        self.ratio_ema = {k: float(v) for k, v in state["ratio_ema"].items()}
