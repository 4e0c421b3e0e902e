"""Schedules that pruning methods compose: adaptive weights, linear paths, cubic and cyclic ramps.

Several papers steer a penalty weight or a target over training with the same few shapes; here
each shape is written once, as a small value object or a pure function of the step, so that a
method file states its mechanism and not its bookkeeping (the shape of
``torch.ao.pruning.scheduler``: the schedule apart from the sparsifier).

- ``AdaptiveWeight``: a weight that grows by ``1 + rate`` per 1% of training while a condition
  holds and shrinks back at the same rate (to a floor) otherwise: GDP's and W-Gates' lambda,
  DAIS's lambda, DSA's rho (which only grows).
- ``progress`` / ``linear_path``: the fraction of a phase done at a step, and a limit falling
  linearly from the dense value to the budget over that phase (GDP's path, W-Gates' T(t)).
- ``cubic``: Zhu and Gupta's ramp, used by GMP, GraNet, cyclical pruning and the N:M ramp.
- ``stepwise``: a value raised by a fixed increment every ``every`` steps up to a ceiling (GReg's
  lambda schedule: +1e-4 every 10 iterations up to 1 in the official code).
- ``Clock``: a paper's absolute iteration counts (GReg's 100k iterations of growth, 10k of
  stabilize) compressed into the steps of a run: each run step stands for ``per_step`` official
  iterations, and ``events`` counts the official every-K updates that fall inside one step.

>>> w = AdaptiveWeight(1.0, rate=0.2, total_steps=100)  # 100 steps: one step is 1% of training
>>> w.update(grow=True), round(w.update(grow=True), 4)
(1.2, 1.44)
>>> round(w.update(grow=False), 4)
1.2
>>> linear_path(dense=100.0, limit=50.0, done=progress(step=30, start=20, length=20))
75.0
>>> round(cubic(step=5, begin=0, end=10, final=0.8), 4)
0.7
>>> [stepwise(s, increment=0.25, every=10, ceiling=1.0) for s in (0, 9, 10, 35, 80)]
[0.0, 0.0, 0.25, 0.75, 1.0]
>>> c = Clock(iterations=1000, steps=40)  # 25 official iterations per run step
>>> c.per_step, c.at(4), [c.events(s, every=10) for s in (1, 2, 3, 4)]
(25.0, 100.0, [2, 3, 2, 3])
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from fxprune.errors import ConfigError


@dataclass
class AdaptiveWeight:
    """A penalty weight steered per step: ``update(grow)`` multiplies it by ``(1 + rate)`` per 1%
    of ``total_steps`` when ``grow`` and divides it by that factor otherwise, never below
    ``floor`` (default: its start; ``floor=0`` lets it shrink freely) nor above ``ceiling``.
    The per-1% rate makes the schedule independent of the run's length: a run of 10x the steps
    changes the weight 10x less per step and the same per fraction of training.

    Raises ``ConfigError`` for a non-positive start or total, or a negative rate."""

    value: float
    rate: float
    total_steps: int
    floor: float | None = None
    ceiling: float = math.inf

    def __post_init__(self) -> None:
        if not self.value > 0 or self.rate < 0 or not self.total_steps or self.total_steps < 1:
            raise ConfigError(f"AdaptiveWeight needs value > 0, rate >= 0 and total_steps >= 1; got value={self.value}, "
                              f"rate={self.rate}, total_steps={self.total_steps}")
        if self.floor is None:
            self.floor = self.value

    @property
    def factor(self) -> float:
        """The change of one step: ``1 + rate`` per 1% of training."""
        return (1 + self.rate) ** (100 / self.total_steps)

    def update(self, grow: bool) -> float:
        """One step: grow or shrink; returns the new value."""
        v = self.value * self.factor if grow else self.value / self.factor
        self.value = min(max(v, self.floor), self.ceiling)
        return self.value


def progress(step: float, start: float, length: float) -> float:
    """The fraction of a phase ``[start, start + length)`` done at ``step``, clipped to [0, 1]
    (a phase of length below one step counts as one step). Raises nothing."""
    return min(max((step - start) / max(length, 1.0), 0.0), 1.0)


def linear_path(dense: float, limit: float, done: float) -> float:
    """A limit falling linearly from ``dense`` (``done`` = 0) to ``limit`` (``done`` = 1). Raises nothing."""
    return dense - (dense - limit) * done


def cubic(step: int, begin: int, end: int, final: float, initial: float = 0.0) -> float:
    """The Zhu-Gupta ramp: ``initial`` before ``begin``, ``final`` from ``end`` on, and
    s = final + (initial - final) * (1 - t)^3 between, t the position in [begin, end]. Raises nothing."""
    if step >= end:
        return final
    if step <= begin:
        return initial
    t = (step - begin) / (end - begin)
    return final + (initial - final) * (1 - t) ** 3


def stepwise(step: int, increment: float, every: int, ceiling: float) -> float:
    """``increment`` added once per ``every`` steps from 0, up to ``ceiling``. Raises
    ``ConfigError`` for every < 1."""
    if every < 1:
        raise ConfigError(f"stepwise schedule needs every >= 1, got {every}")
    return min(increment * (step // every), ceiling)


@dataclass(frozen=True)
class Clock:
    """An official schedule of ``iterations`` iterations laid over a run of ``steps`` steps: run step
    ``s`` (1-based) stands for official iterations ``(at(s - 1), at(s)]``. A method that counts its
    updates in official iterations (every K of them) then keeps the official schedule's shape and
    its integrated quantities at any run length: a run of 10x the steps makes each step stand for
    10x fewer iterations. Raises ``ConfigError`` for ``iterations <= 0`` or ``steps < 1``."""

    iterations: float
    steps: int

    def __post_init__(self) -> None:
        if not self.iterations > 0 or self.steps < 1:
            raise ConfigError(f"Clock needs iterations > 0 and steps >= 1; got iterations={self.iterations}, "
                              f"steps={self.steps}")

    @property
    def per_step(self) -> float:
        """Official iterations one run step stands for (below 1 when the run is the longer)."""
        return self.iterations / self.steps

    def at(self, step: float) -> float:
        """The official iteration reached after run step ``step``."""
        return step * self.per_step

    def events(self, step: int, every: float) -> int:
        """How many official updates "every ``every`` iterations" fall in run step ``step``:
        the multiples of ``every`` in ``(at(step - 1), at(step)]``."""
        return math.floor(self.at(step) / every + 1e-9) - math.floor(self.at(step - 1) / every + 1e-9)
