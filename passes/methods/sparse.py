"""Shared machinery of the weight-sparsity methods (gmp, cyclical, granet, lap, sculpt, nm).

A weight method masks every prunable weight of ``ctx.targets.weights`` (``fxprune.passes.masks``)
and moves its masks along a sparsity schedule: ``sparsity_at(step)`` is the fraction of zeros
the masks should hold after optimizer step ``step`` (1-based, over ``ctx.total_steps``), and
every ``interval`` steps (and at the schedule's milestones) ``update`` recomputes the masks from
``scores`` at that fraction: one threshold over all prunable weights (``Budget(scope="global")``)
or the same fraction per weight (``"layer"``); under ``Budget(nm=(n, m))`` the fraction of each
weight's groups of m held to n non-zeros grows with the schedule instead (``sparsity.nm_mask``).
Removed weights are set to exactly 0 when a mask changes (so one that comes back restarts from
0) and the optimizer's momentum for them is cleared when the loop told the method its optimizer.

Between updates a method either trains with fixed masks (``regrowing`` False: the removed
weights get no gradient and stay 0) or lets them move under the dense, straight-through gradient
(cyclical's time-varying projected gradient descent), so that at the next update they compete
by magnitude again. ``decide`` returns the masks at the final target (computed at once, one-shot,
when training stopped before the schedule reached it, or when there was no training).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from fxprune import sparsity as sp
from fxprune.decision import Decision
from fxprune.errors import ConfigError
from fxprune.method import METHODS, Context, Method
from fxprune.passes.masks import WeightMask, insert_masks


@dataclass(frozen=True)
class ScheduleOptions:
    """``begin``/``end``: where the ramp to the target starts and reaches it, as fractions of the
    training steps (begin == end: one-shot at that point); ``interval``: steps between mask
    updates (0: 1% of the steps)."""

    begin: float = 0.1
    end: float = 0.7
    interval: int = 0


class WeightMethod(Method):
    """Base of the weight-sparsity methods; subclasses set ``sparsity_at`` (and ``scores``,
    ``regrowing``, ``update`` where they differ)."""

    granularity = "weight"
    Options: ClassVar[type] = ScheduleOptions
    score_name: ClassVar[str] = "magnitude"
    budgets: ClassVar[tuple[str, ...]] = ("sparsity", "nm")  # the Budget fields the method can meet

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.masks: dict[str, WeightMask] = {}
        self.applied = 0.0  # the sparsity the masks hold (fraction of the final target's kind)
        self.updates = 0
        begin, end = getattr(self.options, "begin", 0.0), getattr(self.options, "end", 1.0)
        if not 0.0 <= begin <= end <= 1.0:
            raise ConfigError(f"method {self.name!r}: need 0 <= begin <= end <= 1, got begin={begin}, end={end}")

    # ---- set-up ---------------------------------------------------------------------------------
    def prepare(self, ctx: Context) -> None:
        t = ctx.targets.weights
        if t is None:
            raise ConfigError(f"method {self.name!r} zeroes single weights: give it a sparsity budget, e.g. "
                              "fxprune.Budget(sparsity=0.9) or Budget(nm=(2, 4)); for channels use l1, gdp, ...")
        kind = "nm" if t.nm is not None else "sparsity"
        if kind not in self.budgets:
            able = sorted(n for n, c in METHODS.items() if kind in getattr(c, "budgets", ()))
            raise ConfigError(f"method {self.name!r} does not reach Budget({kind}=...) targets; for those use "
                              f"{', '.join(able)}")
        ctx.module, self.masks = insert_masks(ctx.traced, t.sizes)
        self.start(ctx)

    def start(self, ctx: Context) -> None:
        """Masks before the first step (default: all kept)."""

    # ---- schedule -------------------------------------------------------------------------------
    def final(self, ctx: Context) -> float:
        return ctx.targets.weights.fraction()

    def steps(self, ctx: Context, fraction: float) -> int:
        return int(round(fraction * ctx.total_steps))

    def interval(self, ctx: Context) -> int:
        return getattr(self.options, "interval", 0) or max(1, ctx.total_steps // 100)

    def sparsity_at(self, ctx: Context, step: int) -> float:
        """Target sparsity after ``step`` (default: the cubic ramp from 0 over [begin, end])."""
        return sp.cubic(step, self.steps(ctx, self.options.begin), self.steps(ctx, self.options.end), self.final(ctx))

    def milestones(self, ctx: Context) -> set[int]:
        """Steps that always update (the ramp's ends)."""
        return {self.steps(ctx, self.options.begin), self.steps(ctx, self.options.end)}

    def due(self, ctx: Context, step: int) -> bool:
        """Whether the masks are recomputed after ``step``: every ``interval`` steps and at the milestones."""
        return step % self.interval(ctx) == 0 or step in self.milestones(ctx)

    def regrowing(self, ctx: Context, step: int) -> bool:
        """Whether removed weights train under the dense gradient at ``step`` (default: never)."""
        return False

    # ---- masks ----------------------------------------------------------------------------------
    def scores(self, ctx: Context) -> dict[str, torch.Tensor]:
        """What ``update`` ranks by (default: magnitude of the weights the model computes with)."""
        return {name: wm.effective().abs() for name, wm in self.masks.items()}

    def masks_at(self, ctx: Context, sparsity: float, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Keep masks with ``sparsity`` zeros (of the final target's kind) ranked by ``scores``."""
        t = ctx.targets.weights
        if t.nm is not None:
            n, m = t.nm
            share = sparsity / t.fraction()
            return {name: sp.nm_mask(s, n, m, t.dims[name], share) for name, s in scores.items()}
        return sp.magnitude_masks(scores, t.zeros(sparsity))

    def install(self, ctx: Context, keep: dict[str, torch.Tensor]) -> None:
        """Set new masks: removed weights to 0, their optimizer state cleared."""
        for name, mask in keep.items():
            wm = self.masks[name]
            wm.set(mask)
            _clear_state(ctx.optimizer, wm.param, mask)

    def update(self, ctx: Context, sparsity: float) -> None:
        """Masks at ``sparsity`` from ``scores`` (the default magnitude/criterion update)."""
        self.install(ctx, self.masks_at(ctx, sparsity, self.scores(ctx)))

    # ---- hooks ----------------------------------------------------------------------------------
    def after_backward(self, ctx: Context) -> None:
        if not self.regrowing(ctx, ctx.step + 1):
            for wm in self.masks.values():
                wm.mask_grad()

    def after_step(self, ctx: Context) -> None:
        if not ctx.total_steps:
            raise ConfigError(f"method {self.name!r} schedules its masks over the run: pass total_steps to "
                              "fxprune.prepare (epochs * len(loader)); compile does")
        step = ctx.step
        target = self.sparsity_at(ctx, step)
        if self.due(ctx, step) and target != self.applied:
            self.update(ctx, target)
            self.applied = target
            self.updates += 1
        elif not self.regrowing(ctx, step):
            for wm in self.masks.values():  # momentum must not move a removed weight off 0
                with torch.no_grad():
                    wm.param.mul_(wm.mask.to(wm.param.dtype))

    def decide(self, ctx: Context, data: Any = None) -> Decision:
        final = self.final(ctx)
        if self.applied != final:  # no training, or training stopped before the schedule's end
            self.update(ctx, final)
            self.applied = final
        return Decision({}, weight_masks={name: wm.mask.clone() for name, wm in self.masks.items()})

    # ---- state and report -----------------------------------------------------------------------
    def schedule(self, ctx: Context) -> dict[str, float]:
        zeros = sum(int((~wm.mask).sum()) for wm in self.masks.values())
        total = sum(wm.mask.numel() for wm in self.masks.values())
        return {"sparsity": zeros / max(1, total), "target_now": self.applied}

    def state_dict(self) -> dict[str, Any]:
        return {"applied": self.applied, "updates": self.updates}  # the masks are buffers of the module

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.applied = float(state["applied"])
        self.updates = int(state["updates"])

    def report(self, ctx: Context) -> dict[str, Any]:
        return {"mask_updates": self.updates, "score": self.score_name}


def _clear_state(optimizer: torch.optim.Optimizer | None, param: torch.nn.Parameter, keep: torch.Tensor) -> None:
    """Zero the optimizer's running state (SGD momentum, Adam moments) of removed weights."""
    if optimizer is None:
        return
    for value in optimizer.state.get(param, {}).values():
        if isinstance(value, torch.Tensor) and value.shape == keep.shape:
            value.mul_(keep.to(value.dtype))


def cycle_position(step: int, length: float) -> tuple[int, float]:
    """(cycle index, position in [0, 1]) of ``step`` in cycles of ``length`` steps from step 0."""
    c = int(step // length) if length > 0 else 0
    return c, (step - c * length) / length if length > 0 else 1.0
