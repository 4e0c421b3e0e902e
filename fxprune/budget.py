"""Budgets: what a pruned model may cost, as fractions of the dense model or absolute numbers."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from fxprune import sparsity as sp
from fxprune.cost import CostModel
from fxprune.errors import BudgetError, ConfigError


# Budget field -> the cost-model resource it limits (FLOPs are counted as MACs).
RESOURCE_OF = {"flops": "macs", "params": "params"}


@dataclass(frozen=True, init=False)
class Budget:
    """``flops``/``params``: a fraction of the dense model (0 < f <= 1) or an absolute count (> 1).

    FLOPs are multiply-accumulates of conv and linear layers per example. ``round_to=N`` keeps
    every group's kept size a multiple of N (hardware-friendly widths). Each field limits one
    resource of the cost model (``RESOURCE_OF``).

    Weight sparsity instead (for the weight methods: gmp, cyclical, granet, lap, sculpt, nm):
    ``sparsity=0.9`` is the fraction of zero weights over the prunable conv/linear weights, with
    one magnitude threshold over all of them (``scope="global"``) or the same fraction in each
    (``"layer"``); ``nm=(2, 4)`` keeps at most 2 of every 4 consecutive weights along the input
    dimension. ``dense_ends=True`` keeps the first and last layer dense. A channel budget and a
    sparsity budget compose in sequence: compile with one, then compile the pruned model with the
    other. Raises ``ConfigError`` for a missing, non-numeric, non-finite or non-positive limit, for
    both kinds at once, and for an unknown field (``latency`` is not a budget yet); ``resolve``
    raises ``BudgetError``.
    """

    flops: float | None
    params: float | None
    round_to: int
    sparsity: float | None
    scope: str
    nm: tuple[int, int] | None
    dense_ends: bool

    def __init__(self, flops: float | None = None, params: float | None = None, round_to: int = 1,
                 sparsity: float | None = None, scope: str = "global", nm: tuple[int, int] | None = None,
                 dense_ends: bool = False, **unknown: object) -> None:
        if unknown:  # a typo or a budget kind that does not exist must not be dropped silently
            if "latency" in unknown:
                raise ConfigError("Budget(latency=...) is not supported yet: fxprune budgets limit FLOPs (MACs) and "
                                  "parameters; for CPU latency use Budget(flops=..., round_to=16) and measure with "
                                  "compile(..., validate=['onnxruntime'])")
            raise ConfigError(f"Budget has no field(s) {sorted(unknown)}; its fields: flops, params, round_to, "
                              "sparsity, scope, nm, dense_ends")
        nm = sp.check_options(sparsity, scope, nm)
        weights = sparsity is not None or nm is not None
        if sparsity is not None and nm is not None:
            raise ConfigError("Budget takes sparsity=... or nm=(n, m), not both (N:M fixes the sparsity at 1 - n/m)")
        if weights and (flops is not None or params is not None):
            raise ConfigError("Budget limits channels (flops/params) or weights (sparsity/nm), not both at once: "
                              "compile with the channel budget, then compile the pruned model with the sparsity one")
        if not weights and flops is None and params is None:
            raise ConfigError("Budget needs flops=... and/or params=... (a fraction in (0, 1] or an absolute count), "
                              "or sparsity=... / nm=(n, m) for weight sparsity")
        if not isinstance(dense_ends, bool):
            raise ConfigError(f"Budget dense_ends={dense_ends!r} must be True or False")
        for name, v in (("flops", flops), ("params", params)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf):
                raise ConfigError(f"Budget {name}={v!r}: must be a finite number, a fraction in (0, 1] or an "
                                  "absolute count > 1, e.g. Budget(flops=0.5)")
        if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
            raise ConfigError(f"Budget round_to={round_to!r} must be an int >= 1")
        object.__setattr__(self, "flops", flops)
        object.__setattr__(self, "params", params)
        object.__setattr__(self, "round_to", round_to)
        for name, value in (("sparsity", sparsity), ("scope", scope), ("nm", nm), ("dense_ends", dense_ends)):
            object.__setattr__(self, name, value)

    @property
    def weights(self) -> bool:
        """Whether this budget limits weights (sparsity) rather than channels."""
        return self.sparsity is not None or self.nm is not None

    def to_dict(self) -> dict:
        return asdict(self)

    def limits(self) -> dict[str, float]:
        """The limit per resource name, as given (fraction or absolute)."""
        return {RESOURCE_OF[f]: getattr(self, f) for f in RESOURCE_OF if getattr(self, f) is not None}

    def resolve(self, cost: CostModel) -> "Targets":
        """Absolute targets for this model; raises BudgetError below what can be reached (or, for
        a sparsity budget, when no weight of the model qualifies)."""
        dense = {name: int(f()) for name, f in cost.resources.items()}
        if self.weights:
            sizes, dims, skipped = sp.prunable_weights(cost.gm, cost.cg, self.dense_ends, self.nm)
            weights = sp.WeightTargets(sizes, dims, skipped, self.sparsity, self.scope, self.nm)
            return Targets({}, dense, dict(dense), self.round_to, weights)
        floor = cost.floor({g.id: min(g.size, self.round_to) for g in cost.cg.prunable_groups})
        limits = {name: _absolute(v, dense[name]) for name, v in self.limits().items()}
        for name, limit in limits.items():
            if limit < floor[name]:
                width = "" if self.round_to == 1 else f" {self.round_to}-wide"
                raise BudgetError(
                    f"{name} budget {limit:,} is below the floor of {floor[name]:,} "
                    f"({floor[name] / dense[name]:.1%} of the dense {dense[name]:,}) that the unprunable layers and "
                    f"one{width} unit per group already cost; raise the budget or make more of the model "
                    "prunable (see analyze's reasons)."
                )
        return Targets(limits, dense, floor, self.round_to)


def _absolute(value: float, dense: int) -> int:
    return int(value * dense) if value <= 1 else int(value)


@dataclass(frozen=True)
class Targets:
    """A budget resolved against one model: an absolute limit per resource."""

    limits: dict[str, int]
    dense: dict[str, int]
    floor: dict[str, int]
    round_to: int = 1
    weights: sp.WeightTargets | None = None  # a sparsity budget: which weights, how many zeros

    def met(self, cost: CostModel, keep: dict) -> bool:
        return all(cost.resource(name)(keep) <= limit for name, limit in self.limits.items())

    @property
    def macs(self) -> int | None:
        return self.limits.get("macs")

    @property
    def params(self) -> int | None:
        return self.limits.get("params")

    @property
    def dense_macs(self) -> int:
        return self.dense["macs"]

    @property
    def dense_params(self) -> int:
        return self.dense["params"]


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
    Raises ``BudgetError`` when even every group at its minimum width misses ``targets``.
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
