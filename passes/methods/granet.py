"""GraNet: gradual pruning with zero-cost neuroregeneration (Liu et al., NeurIPS 2021), METHODS.md §8.1.

At every mask update in [``begin``, ``end``]: (1) magnitude pruning to the cubic schedule's
sparsity, from ``init_sparsity`` (0: dense to sparse) to the target, one threshold over all
prunable weights (``Budget(scope=...)``); (2) neuroregeneration that leaves the density unchanged:
per weight tensor, a further fraction r(t) of the surviving weights goes by magnitude and as many
removed positions come back where the gradient magnitude is largest (the gradient of the step
just taken, which the straight-through mask gives for every weight: "zero-cost"), starting from
0. r(t) decays by cosine from ``regrow`` to ``regrow_end`` over the training steps. Between
updates and after ``end`` the masks are fixed.

From the paper's code [V]: the cubic schedule, the per-layer death by magnitude and regrowth by
gradient, the cosine decay of r from 0.5 to 0.005, regrown weights starting at 0. Library
choices [A]: ``begin`` 0 and ``end`` 0.5 of the steps (CIFAR's 0-80 of 160 epochs), an update
every 1% of the steps (the paper: every 1000 iterations).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fxprune import sparsity as sp
from fxprune.errors import ConfigError
from fxprune.method import Context, register_method
from fxprune.passes.methods.sparse import ScheduleOptions, WeightMethod


@dataclass(frozen=True)
class GraNetOptions(ScheduleOptions):
    begin: float = 0.0
    end: float = 0.5
    init_sparsity: float = 0.0
    regrow: float = 0.5
    regrow_end: float = 0.005


@register_method
class GraNet(WeightMethod):
    """Cubic magnitude pruning plus per-layer death and gradient regrowth at every update."""

    name = "granet"
    Options = GraNetOptions
    budgets = ("sparsity",)

    def __init__(self, **options) -> None:
        super().__init__(**options)
        o = self.options
        if not 0.0 <= o.init_sparsity < 1.0 or not 0.0 <= o.regrow_end <= o.regrow < 1.0:
            raise ConfigError(f"method 'granet': need 0 <= init_sparsity < 1 and 0 <= regrow_end <= regrow < 1, got "
                              f"init_sparsity={o.init_sparsity}, regrow={o.regrow}, regrow_end={o.regrow_end}")
        self.grads: dict[str, torch.Tensor] = {}
        self.regrown = 0


    def sparsity_at(self, ctx: Context, step: int) -> float:
        return sp.cubic(step, self.steps(ctx, self.options.begin), self.steps(ctx, self.options.end),
                        self.final(ctx), min(self.options.init_sparsity, self.final(ctx)))

    def start(self, ctx: Context) -> None:
        s0 = min(self.options.init_sparsity, self.final(ctx))
        if s0 > 0:  # sparse to sparse: the initial mask by magnitude at init_sparsity
            self.install(ctx, self.masks_at(ctx, s0, self.scores(ctx)))
            self.applied = s0

    def rate(self, ctx: Context, step: int) -> float:
        o = self.options
        return o.regrow_end + 0.5 * (o.regrow - o.regrow_end) * (1 + math.cos(math.pi * step / ctx.total_steps))

    def _due(self, ctx: Context, step: int) -> bool:
        """A mask update inside [begin, end], where the regeneration runs."""
        begin, end = self.steps(ctx, self.options.begin), self.steps(ctx, self.options.end)
        return begin <= step <= end and self.due(ctx, step)

    def after_backward(self, ctx: Context) -> None:
        if ctx.total_steps and self._due(ctx, ctx.step + 1):  # keep the dense gradient for the regrowth
            self.grads = {name: wm.param.grad.detach().abs().clone() for name, wm in self.masks.items()
                          if wm.param.grad is not None}
        super().after_backward(ctx)

    def after_step(self, ctx: Context) -> None:
        if ctx.total_steps and self._due(ctx, ctx.step) and self.sparsity_at(ctx, ctx.step) == self.applied:
            self.update(ctx, self.applied)  # the sparsity stays, the regeneration still runs
            self.updates += 1
        super().after_step(ctx)

    def update(self, ctx: Context, sparsity: float) -> None:
        keep = self.masks_at(ctx, sparsity, self.scores(ctx))
        rate = self.rate(ctx, ctx.step) if self.grads else 0.0
        for name, mask in keep.items():
            grad = self.grads.get(name)
            alive = int(mask.sum())
            k = min(int(rate * alive), int((~mask).sum()))
            if grad is None or k == 0:
                continue
            w = self.masks[name].effective().abs()
            flat = mask.reshape(-1).clone()
            dead = torch.nonzero(flat).squeeze(1)[torch.argsort(w.reshape(-1)[flat], stable=True)[:k]]
            flat[dead] = False
            candidates = torch.where(flat, torch.full_like(grad.reshape(-1), -1.0), grad.reshape(-1))
            flat[torch.topk(candidates, k).indices] = True
            keep[name] = flat.view(mask.shape)
            self.regrown += k
        self.install(ctx, keep)
        self.grads = {}

    def report(self, ctx: Context) -> dict[str, object]:
        return {**super().report(ctx), "regrown_weights": self.regrown}

    def state_dict(self) -> dict[str, object]:
        return {**super().state_dict(), "regrown": self.regrown}

    def load_state_dict(self, state: dict[str, object]) -> None:
        super().load_state_dict(state)
        self.regrown = int(state["regrown"])
