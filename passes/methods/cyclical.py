"""Cyclical pruning (Srinivas, Kuzmin, Nagel, van Baalen, Skliar, Blankevoort; CVPR-W 2022),
METHODS.md §7; and ``nm``, N:M masks on the same schedule.

A time-varying projected gradient descent: theta <- Pi_{s(t)}(theta - lr * grad) with a
*periodic* sparsity schedule. Over the first ``end`` of training there are ``cycles`` equal
cycles; in each, sparsity ramps from ``s0`` to the target along the cubic, reaching it on the
cycle's last step, and drops back to ``s0`` at the next cycle's first step. The gradient is
dense (straight-through the mask) during the cycles: a removed weight keeps training from 0 and
comes back at the next projection if its magnitude beats the threshold, which the drop to
``s0`` lowers, so weights pruned wrongly in one cycle can recover in the next. After ``end`` the
mask is fixed at the target and the run fine-tunes. Projections rank the trained tensors (not
the masked ones: a removed weight's own value is what competes) and happen every ``interval``
steps and at every cycle's first and last step; a removed weight is set to 0 and its momentum
cleared at each.

From the paper (abstract): the periodic schedule and its purpose. This library's choices [A]
(the paper's body was not reachable): 3 equal cycles, s0 = 0, cubic ramp, one threshold over all
prunable weights (``Budget(scope=...)`` chooses), ``end`` 0.75, the learning rate independent of
the cycles (``lr_restart=True`` restarts the trainer's cosine each cycle).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fxprune import sparsity as sp
from fxprune.errors import ConfigError
from fxprune.method import Context, register_method
from fxprune.passes.methods.sparse import WeightMethod, cycle_position


@dataclass(frozen=True)
class CyclicalOptions:
    cycles: int = 3
    s0: float = 0.0
    end: float = 0.75
    interval: int = 0
    lr_restart: bool = False


@register_method
class Cyclical(WeightMethod):
    """Periodic cubic sparsity ramps with dense gradients, then a fixed-mask phase."""

    name = "cyclical"
    Options = CyclicalOptions

    def __init__(self, **options) -> None:
        super().__init__(**options)
        if self.options.cycles < 0 or not 0.0 <= self.options.s0 < 1.0:
            raise ConfigError(f"method {self.name!r}: cycles must be >= 0 and s0 in [0, 1), got "
                              f"cycles={self.options.cycles}, s0={self.options.s0}")

    def length(self, ctx: Context) -> float:
        return self.options.end * ctx.total_steps / max(1, self.options.cycles)

    def cycles_end(self, ctx: Context) -> int:
        return self.steps(ctx, self.options.end)

    def sparsity_at(self, ctx: Context, step: int) -> float:
        final = self.final(ctx)
        if step >= self.cycles_end(ctx):
            return final
        if self.options.cycles == 0:  # one-shot at ``end``
            return 0.0
        c, _ = cycle_position(step, self.length(ctx))
        start = int(round(c * self.length(ctx)))
        stop = int(round((c + 1) * self.length(ctx))) - 1
        return sp.cubic(step, start, stop, final, min(self.options.s0, final))

    def milestones(self, ctx: Context) -> set[int]:
        length = self.length(ctx)
        ends = {int(round(c * length)) for c in range(1, self.options.cycles + 1)}
        return ends | {e - 1 for e in ends} | {self.cycles_end(ctx)}

    def regrowing(self, ctx: Context, step: int) -> bool:
        return self.options.cycles > 0 and step <= self.cycles_end(ctx)

    def scores(self, ctx: Context) -> dict[str, torch.Tensor]:
        return {name: wm.param.detach().abs() for name, wm in self.masks.items()}

    def lr_factor(self, ctx: Context, step: int) -> float | None:
        if not self.options.lr_restart or not ctx.total_steps:
            return None
        if step >= self.cycles_end(ctx) or self.options.cycles == 0:  # the last stretch: one cosine of its own
            rest = max(1, ctx.total_steps - self.cycles_end(ctx))
            return 0.5 * (1 + math.cos(math.pi * (step - self.cycles_end(ctx)) / rest))
        _, pos = cycle_position(step, self.length(ctx))
        return 0.5 * (1 + math.cos(math.pi * pos))


@dataclass(frozen=True)
class NMOptions(CyclicalOptions):
    cycles: int = 0
    end: float = 0.5


@register_method
class NM(Cyclical):
    """N:M masks (``Budget(nm=(2, 4))``) by magnitude: once at ``end`` (default, then fixed-mask
    fine-tuning, as NVIDIA's ASP recipe), or with ``cycles > 0`` on the cyclical schedule, the
    share of each weight's groups held to N:M ramping like the sparsity does."""

    name = "nm"
    Options = NMOptions
    budgets = ("nm",)
