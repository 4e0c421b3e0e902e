"""Budgets: what a pruned model may cost, as fractions of the dense model or absolute numbers."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from fxprune.cost import CostModel
from fxprune.errors import BudgetError, ConfigError


@dataclass(frozen=True)
class Budget:
    """``flops``/``params``: a fraction of the dense model (0 < f <= 1) or an absolute count (> 1).

    FLOPs are multiply-accumulates of conv and linear layers per example. ``round_to=N`` keeps
    every group's kept size a multiple of N (hardware-friendly widths).
    """

    flops: float | None = None
    params: float | None = None
    round_to: int = 1

    def __post_init__(self) -> None:
        if self.flops is None and self.params is None:
            raise ConfigError("Budget needs flops=... and/or params=... (a fraction in (0, 1] or an absolute count)")
        for name in ("flops", "params"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ConfigError(f"Budget {name}={v}: must be a fraction in (0, 1] or an absolute count > 1")
        if int(self.round_to) < 1:
            raise ConfigError(f"Budget round_to={self.round_to} must be >= 1")

    def to_dict(self) -> dict:
        return asdict(self)

    def resolve(self, cost: CostModel) -> "Targets":
        """Absolute targets for this model; raises BudgetError below what can be reached."""
        dense_macs, dense_params = int(cost.macs()), int(cost.params())
        min_units = {g.id: min(g.size, self.round_to) for g in cost.cg.prunable_groups}
        floor_macs, floor_params = cost.floor(min_units)
        macs = _absolute(self.flops, dense_macs)
        params = _absolute(self.params, dense_params)
        if macs is not None and macs < floor_macs:
            raise BudgetError(
                f"FLOPs budget {macs:,} MACs is below the floor of {floor_macs:,} MACs "
                f"({floor_macs / dense_macs:.1%} of the dense {dense_macs:,}) that the unprunable layers and "
                f"one{'' if self.round_to == 1 else f' {self.round_to}-wide'} unit per group already cost; "
                "raise the budget or make more of the model prunable (see analyze's reasons)."
            )
        if params is not None and params < floor_params:
            raise BudgetError(
                f"parameter budget {params:,} is below the floor of {floor_params:,} "
                f"({floor_params / dense_params:.1%} of the dense {dense_params:,}) that unprunable layers already cost."
            )
        return Targets(macs, params, dense_macs, dense_params, floor_macs, floor_params, int(self.round_to))


def _absolute(value: float | None, dense: int) -> int | None:
    if value is None:
        return None
    return int(value * dense) if value <= 1 else int(value)


@dataclass(frozen=True)
class Targets:
    """A budget resolved against one model."""

    macs: int | None
    params: int | None
    dense_macs: int
    dense_params: int
    floor_macs: int
    floor_params: int
    round_to: int

    def met(self, cost: CostModel, keep: dict) -> bool:
        return (self.macs is None or cost.macs(keep) <= self.macs) and (
            self.params is None or cost.params(keep) <= self.params)


def fewest_meeting(cost: CostModel, targets: Targets, keep_after: Callable[[int], dict], n: int) -> int | None:
    """The smallest k in [0, n] whose ``keep_after(k)`` meets ``targets`` (None if even n does not).

    ``keep_after(k)`` removes the first k of a fixed ranking, so cost is monotone in k and a
    binary search needs log2(n) cost evaluations.
    """
    if not targets.met(cost, keep_after(n)):
        return None
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        if targets.met(cost, keep_after(mid)):
            hi = mid
        else:
            lo = mid + 1
    return lo


def allocate(cost: CostModel, targets: Targets, scores: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Keep masks that meet ``targets``, removing the lowest-scoring units first (global ranking).

    Scores are comparable across groups (the caller normalises them). Groups keep at least one
    ``round_to``-wide unit and a multiple of ``round_to`` units. Binary search over how many of
    the globally sorted units to remove: cost is monotone in that number.
    """
    order = sorted(((float(s), gid, u) for gid, arr in scores.items() for u, s in enumerate(arr)))
    sizes = {gid: len(arr) for gid, arr in scores.items()}
    ranked = {gid: np.argsort(-np.asarray(arr), kind="stable") for gid, arr in scores.items()}

    def keep_after(k: int) -> dict[int, np.ndarray]:
        removed = {gid: 0 for gid in scores}
        for _, gid, _ in order[:k]:
            removed[gid] += 1
        keep = {}
        for gid, n in sizes.items():
            r = targets.round_to
            kept = max(min(n, r), ((n - removed[gid]) // r) * r if n - removed[gid] < n else n)
            mask = np.zeros(n, dtype=bool)
            mask[ranked[gid][:kept]] = True
            keep[gid] = mask
        return keep

    k = fewest_meeting(cost, targets, keep_after, len(order))
    if k is None:
        raise BudgetError("the budget cannot be met even with every prunable group at its minimum width")
    return keep_after(k)
