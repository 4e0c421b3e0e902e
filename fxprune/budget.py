"""Budgets: what a pruned model may cost, as fractions of the dense model or absolute numbers."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from fxprune import sparsity as sp
from fxprune.cost import CostModel
from fxprune.errors import BudgetError, ConfigError


# Budget field -> the cost-model resource it limits (FLOPs are counted as MACs; latency in
# microseconds, predicted by the backend's LPNet, ``fxprune.lpnet``).
RESOURCE_OF = {"flops": "macs", "params": "params", "latency": "latency"}


@dataclass(frozen=True, init=False)
class Budget:
    """``flops``/``params``: a fraction of the dense model (0 < f <= 1) or an absolute count (> 1).

    FLOPs are multiply-accumulates of conv and linear layers per example. ``round_to=N`` keeps
    every group's kept size a multiple of N (hardware-friendly widths). Each field limits one
    resource of the cost model (``RESOURCE_OF``).

    Latency: ``latency=0.5`` is a fraction of the dense model's latency measured on ``backend``
    (default ``"onnxruntime"``), ``latency_ms=3.0`` an absolute target; the flow (``prepare`` /
    ``compile``) measures the backend, fits its latency predictor (cached) and, after finalize,
    measures the pruned model and tightens the decision if it missed. A budget that names a
    ``backend`` and no ``round_to`` keeps widths at the backend's detected channel multiple.

    Weight sparsity instead (for the weight methods: gmp, cyclical, granet, lap, sculpt, nm):
    ``sparsity=0.9`` is the fraction of zero weights over the prunable conv/linear weights, with
    one magnitude threshold over all of them (``scope="global"``) or the same fraction in each
    (``"layer"``); ``nm=(2, 4)`` keeps at most 2 of every 4 consecutive weights along the input
    dimension. ``dense_ends=True`` keeps the first and last layer dense. A channel budget and a
    sparsity budget compose in sequence: compile with one, then compile the pruned model with the
    other. Raises ``ConfigError`` for a missing, non-numeric, non-finite or non-positive limit, for
    both kinds at once, for an unknown field and a latency fraction above 1 (the flow checks the backend);
    ``resolve`` raises ``BudgetError``.
    """

    flops: float | None
    params: float | None
    round_to: int | None
    sparsity: float | None
    scope: str
    nm: tuple[int, int] | None
    dense_ends: bool
    latency: float | None
    latency_ms: float | None
    backend: str | None

    def __init__(self, flops: float | None = None, params: float | None = None, round_to: int | None = None,
                 sparsity: float | None = None, scope: str = "global", nm: tuple[int, int] | None = None,
                 dense_ends: bool = False, latency: float | None = None, latency_ms: float | None = None,
                 backend: str | None = None, **unknown: object) -> None:
        if unknown:  # a typo or a budget kind that does not exist must not be dropped silently
            raise ConfigError(f"Budget has no field(s) {sorted(unknown)}; its fields: flops, params, latency, "
                              "latency_ms, backend, round_to, sparsity, scope, nm, dense_ends")
        latency, backend = _check_latency(latency, latency_ms, backend)
        nm = sp.check_options(sparsity, scope, nm)
        weights = sparsity is not None or nm is not None
        if sparsity is not None and nm is not None:
            raise ConfigError("Budget takes sparsity=... or nm=(n, m), not both (N:M fixes the sparsity at 1 - n/m)")
        timed = latency is not None or latency_ms is not None
        if weights and (flops is not None or params is not None or timed):
            raise ConfigError("Budget limits channels (flops/params/latency) or weights (sparsity/nm), not both at once: "
                              "compile with the channel budget, then compile the pruned model with the sparsity one")
        if not weights and flops is None and params is None and not timed:
            raise ConfigError("Budget needs flops=... and/or params=... (a fraction in (0, 1] or an absolute count), "
                              "latency=... (a fraction of the measured dense latency) or latency_ms=..., "
                              "or sparsity=... / nm=(n, m) for weight sparsity")
        if not isinstance(dense_ends, bool):
            raise ConfigError(f"Budget dense_ends={dense_ends!r} must be True or False")
        for name, v in (("flops", flops), ("params", params)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf):
                raise ConfigError(f"Budget {name}={v!r}: must be a finite number, a fraction in (0, 1] or an "
                                  "absolute count > 1, e.g. Budget(flops=0.5)")
        if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
            raise ConfigError(f"Budget round_to={round_to!r} must be an int >= 1 (or None: the backend's channel "
                              "multiple when the budget names a backend, else 1)")
        object.__setattr__(self, "flops", flops)
        object.__setattr__(self, "params", params)
        object.__setattr__(self, "round_to", round_to)
        for name, value in (("sparsity", sparsity), ("scope", scope), ("nm", nm), ("dense_ends", dense_ends),
                            ("latency", latency), ("latency_ms", latency_ms), ("backend", backend)):
            object.__setattr__(self, name, value)

    @property
    def weights(self) -> bool:
        """Whether this budget limits weights (sparsity) rather than channels."""
        return self.sparsity is not None or self.nm is not None

    @property
    def timed(self) -> bool:
        """Whether this budget limits latency (measured on ``backend``)."""
        return self.latency is not None or self.latency_ms is not None

    def to_dict(self) -> dict:
        return asdict(self)

    def limits(self) -> dict[str, float]:
        """The limit per resource name, as given (fraction or absolute; latency_ms in microseconds)."""
        out = {RESOURCE_OF[f]: getattr(self, f) for f in RESOURCE_OF if getattr(self, f) is not None}
        if self.latency_ms is not None:
            out["latency"] = self.latency_ms * 1000.0
        return out

    def resolve(self, cost: CostModel, multiple: int | None = None) -> "Targets":
        """Absolute targets for this model; raises BudgetError below what can be reached (or, for
        a sparsity budget, when no weight of the model qualifies). ``multiple``: the budget's
        backend's channel multiple, the width step when ``round_to`` is not given. A latency
        budget needs the ``"latency"`` resource in ``cost`` (the flow adds the backend's predictor)."""
        if self.timed and "latency" not in cost.resources:
            raise ConfigError("a latency budget is resolved by fxprune.prepare / fxprune.compile, which measure the "
                              f"backend ({self.backend}) and add its latency predictor to the cost model; "
                              "Budget.resolve alone cannot time the model")
        round_to = self.round_to or multiple or 1
        dense = {name: int(f()) for name, f in cost.resources.items()}
        if self.weights:
            sizes, dims, skipped = sp.prunable_weights(cost.gm, cost.cg, self.dense_ends, self.nm)
            weights = sp.WeightTargets(sizes, dims, skipped, self.sparsity, self.scope, self.nm)
            return Targets({}, dense, dict(dense), round_to, weights)
        floor = cost.floor({g.id: min(g.size, round_to) for g in cost.cg.prunable_groups})
        limits = {name: _absolute(v, dense[name]) for name, v in self.limits().items()}
        for name, limit in limits.items():
            if limit < floor[name]:
                width = "" if round_to == 1 else f" {round_to}-wide"
                raise BudgetError(
                    f"{name} budget {limit:,} is below the floor of {floor[name]:,} "
                    f"({floor[name] / dense[name]:.1%} of the dense {dense[name]:,}) that the unprunable layers and "
                    f"one{width} unit per group already cost; raise the budget or make more of the model "
                    "prunable (see analyze's reasons)."
                )
        return Targets(limits, dense, floor, round_to, backend=self.backend if self.timed else None)


def _check_latency(latency: float | None, latency_ms: float | None, backend: str | None) -> tuple[float | None, str | None]:
    """Validate the latency fields; a latency budget without a backend is timed in ONNX Runtime."""
    if latency is not None and latency_ms is not None:
        raise ConfigError("Budget takes latency=<fraction of the dense latency> or latency_ms=<milliseconds>, not both")
    if latency is not None and (isinstance(latency, bool) or not isinstance(latency, (int, float))
                                or not 0 < latency <= 1):
        raise ConfigError(f"Budget latency={latency!r}: a fraction of the dense model's measured latency in (0, 1], "
                          "e.g. Budget(latency=0.5); for milliseconds use latency_ms=")
    if latency_ms is not None and (isinstance(latency_ms, bool) or not isinstance(latency_ms, (int, float))
                                   or not 0 < latency_ms < math.inf):
        raise ConfigError(f"Budget latency_ms={latency_ms!r}: a positive number of milliseconds")
    if backend is not None and not isinstance(backend, str):
        raise ConfigError(f"Budget backend={backend!r}: the name of a latency backend, e.g. 'onnxruntime'")
    if backend is None and (latency is not None or latency_ms is not None):
        backend = "onnxruntime"
    return latency, backend


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
    backend: str | None = None  # a latency budget: where the latency is measured

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

    @property
    def primary(self) -> str:
        """The resource a penalty should push: latency when limited, else MACs, else parameters."""
        for name in ("latency", "macs", "params"):
            if name in self.limits:
                return name
        return "macs"


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


def feed_starved(cost: CostModel, keep: dict[int, np.ndarray], scores: dict[int, np.ndarray],
                 round_to: int = 1) -> dict[int, np.ndarray]:
    """``keep`` (changed in place and returned) where every conv/linear keeps >= 1 input and
    output channel: for each layer ``keep`` would starve (``CostModel.starved``), the
    best-scoring of its units comes back, plus the next best of that group up to a multiple of
    ``round_to``. The allocator counts these units, where finalize would otherwise keep a zero
    channel the budget did not count (shufflenet_v2's branches read half a shuffled group).
    Raises nothing."""
    for parts in cost.starved(keep):  # feeding a layer only adds units: no other layer starves
        if any(keep[g][units].any() for g, units in parts):
            continue  # fed already, through a unit another starved layer brought back
        _, gid, unit = max((float(scores[g][u]), g, int(u)) for g, units in parts if g in scores for u in units)
        keep[gid][unit] = True
        extra = int(keep[gid].sum()) % round_to
        if extra and keep[gid].sum() < len(keep[gid]):
            rest = [u for u in np.argsort(-np.asarray(scores[gid]), kind="stable") if not keep[gid][u]]
            keep[gid][rest[: round_to - extra]] = True
    return keep


def allocate(cost: CostModel, targets: Targets, scores: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Keep masks that meet ``targets``, removing the lowest-scoring units first (global ranking).

    Scores are comparable across groups (the caller normalises them). Groups keep at least one
    ``round_to``-wide unit and a multiple of ``round_to`` units, and every conv/linear keeps an
    input and an output channel (``feed_starved``). Binary search over how many of the globally
    sorted units to remove: cost is monotone in that number.
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
        return feed_starved(cost, keep, scores, targets.round_to)

    k = fewest_meeting(cost, targets, keep_after, len(order))
    if k is None:
        raise BudgetError("the budget cannot be met even with every prunable group at its minimum width")
    return keep_after(k)
