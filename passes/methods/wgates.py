"""W-Gates: binary gates that are a learned function of the filters (Li et al., METHODS.md §2).

The gate of a unit is ``g = 1[s >= 0]`` with ``s`` the output of a gate network that reads that
unit's filter, and nothing else: no free per-unit parameter, no per-layer centring, so the network
sets each layer's kept fraction from its weights (the paper's premise: the decision depends on the
weights). The gradient is straight-through, ``dg/ds = d sigmoid(s / temperature) / ds``. Training
minimises ``task loss + lam * max(0, R(g) / T(t) - 1)``, ``R`` the budget's resource on the gates'
widths (the latency predictor, ``fxprune.lpnet``: the paper's LPNet, under a latency budget; the
bilinear FLOPs otherwise: the FLOPs "Efficiency Module"). ``decide`` reads the binary gates,
filled up to the budget (or cut down to it) by ``allocate``.

Paper [V, abstracts only; no full text or code reachable]: gates a learned function of the filter
weights, binary, trained with the efficiency predictor in the loss. Reconstructed [R]: FC layers
reading ``vec(W_c)``, a step with a straight-through gradient, the hinge on the predicted cost.
This library's choices [A], and why:
- one network (filter -> ``hidden`` -> ReLU -> 1) per filter size ``d`` (C_in*k*k), shared by every
  layer with filters of that size, so the same filter gets the same gate wherever it is; a unit
  with several producers (a residual stream) takes the mean of its producers' outputs;
- its input is the filter times the fixed constant ``sqrt(d)`` (unit scale at a Kaiming start; no
  normalisation by the layer's own statistics, which would erase a layer's level) and detached
  (the weights learn the task, the gate networks learn to read them);
- the last layer starts at weight 0 and bias ``init``: every gate starts open; the task gradient
  through the gates (warm-up included) teaches the network which filters matter;
- the allowed cost ``T(t)`` falls linearly from dense to the budget over ``search`` after a
  ``warmup``; ``lam`` grows by ``1 + lam_rate`` per 1% of training while the binary gates cost more
  than ``T(t)`` (GDP's adaptive weight; ``fxprune.schedules``); the best closed units are held open
  while closing them all would cut below ``T(t)`` (``hold_open``), and units are ranked for
  ``allocate`` relative to their group's extreme score (these three from the benchmark of the
  previous version: benchmarks/results/methods_wgates_validation.md); ``temperature`` 4 (1 saturated);
- ``scope="internal"`` gates only the groups a residual path bypasses (block-internal channels:
  ``fxprune.analysis.bypassed_groups``), the usual ResNet recipe; ``"all"`` (default) gates every
  prunable group.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from fxprune.analysis import bypassed_groups
from fxprune.budget import allocate
from fxprune.decision import Decision
from fxprune.errors import BudgetError, ConfigError
from fxprune.ir import ChannelGroup
from fxprune.method import Context, register_method
from fxprune.passes.gates import Gate, insert_gates
from fxprune.passes.methods.gated import GateMethod
from fxprune.schedules import AdaptiveWeight, linear_path, progress
from fxprune.scores import producers

SCOPES = ("all", "internal")


@dataclass(frozen=True)
class WGatesOptions:
    hidden: int = 16  # width of each gate network
    lam: float = 5.0  # starting weight of the hinge penalty on the budget's resource
    lam_rate: float = 0.2  # lam grows by 1 + lam_rate per 1% of training while the binary gates cost more than T(t)
    warmup: float = 0.1  # fraction of training before the penalty starts
    search: float = 0.5  # fraction of training over which the allowed cost falls to the budget
    init: float = 3.0  # initial score of every unit (the networks' output bias): every gate open
    temperature: float = 4.0  # of the sigmoid the straight-through gradient follows (1.0 saturated)
    surrogate: str = "sigmoid"  # straight-through gradient: of sigmoid(s / temperature), or "identity" (s / temperature)
    scope: str = "all"  # "internal": gate only block-internal groups (bypassed by a residual path)


def gate_net(d: int, hidden: int, init: float) -> nn.Sequential:
    """filter (d) -> hidden -> ReLU -> score, starting at the constant ``init`` (every gate open)."""
    net = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, 1))
    nn.init.zeros_(net[-1].weight)
    nn.init.constant_(net[-1].bias, init)
    return net


class WGate(Gate):
    """Binary gates of one group from its producers' filters (held by reference, not owned) read
    by the shared per-filter-size networks ``nets``."""

    def __init__(self, group: ChannelGroup, filters: list[tuple[nn.Parameter, int, np.ndarray]],
                 nets: nn.ModuleDict, o: WGatesOptions) -> None:
        nn.Module.__init__(self)  # no ``weight``: the gate has no parameter of its own
        self.group_id, self.size = group.id, group.size
        self.nets = nets
        self.temperature, self.surrogate = o.temperature, o.surrogate
        self.floor = torch.zeros(group.size, dtype=torch.bool)  # units held open so the cut follows T(t)
        self.filters = [(p, d, torch.as_tensor(u, dtype=torch.long)) for p, d, u in filters]
        count = torch.zeros(group.size)
        for _, _, u in self.filters:
            count.index_add_(0, u, torch.ones(len(u)))
        self.register_buffer("count", count.clamp_min(1.0), persistent=False)

    def scores(self) -> torch.Tensor:
        """Per unit, the mean over its producers of ``net_d(sqrt(d) * filter)``."""
        s = 0.0
        for param, out_dim, units in self.filters:
            w = param.detach().movedim(out_dim, 0).reshape(param.shape[out_dim], -1)
            net = self.nets[str(w.shape[1])]
            out = net(w.to(net[0].weight.dtype) * math.sqrt(w.shape[1])).squeeze(-1)
            s = s + torch.zeros(self.size, dtype=out.dtype).index_add(0, units, out)
        return s / self.count.to(s.dtype)

    def values(self) -> torch.Tensor:
        """Binary gates (the best-scoring unit and the ``floor`` always open), with a
        straight-through gradient (of sigmoid(s / temperature), or of s / temperature)."""
        s = self.scores()
        soft = torch.sigmoid(s / self.temperature) if self.surrogate == "sigmoid" else s / self.temperature
        hard = (s >= 0) | self.floor
        hard[s.detach().argmax()] = True
        return hard.to(s.dtype) + (soft - soft.detach())  # exactly 0 or 1 forward


@register_method
class WGates(GateMethod):
    """Gates computed from the filters, trained under the budget's resource; decide from the gates."""

    name = "wgates"
    Options = WGatesOptions
    needs_training = True
    needs_total_steps = True

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.options.scope not in SCOPES:
            raise ConfigError(f"wgates option scope={self.options.scope!r}: must be one of {SCOPES}")
        self.nets = nn.ModuleDict()
        self.lam: AdaptiveWeight | None = None

    def make_gate(self, group: ChannelGroup) -> Gate:
        filters = [(self._traced.get_parameter(layer.weight), 1 if layer.kind == "conv_transpose" else 0, site.units)
                   for site, layer in producers(self._traced, self._graph, group)]
        for p, out_dim, _ in filters:
            d = p.numel() // p.shape[out_dim]
            if str(d) not in self.nets:
                self.nets[str(d)] = gate_net(d, self.options.hidden, self.options.init)
        return WGate(group, filters, self.nets, self.options)

    def prepare(self, ctx: Context) -> None:
        self._traced, self._graph = ctx.traced, ctx.graph
        groups = None
        if self.options.scope == "internal":
            groups = sorted(bypassed_groups(ctx.traced, ctx.graph))
            if not groups:
                raise ConfigError("wgates scope='internal': this model has no block-internal group (no prunable "
                                  "group is bypassed by a residual path); use scope='all'")
            t = ctx.targets
            narrow = {gid: np.arange(ctx.graph.group(gid).size) < 1 for gid in groups}
            if not t.met(ctx.cost, narrow):
                raise BudgetError(f"wgates scope='internal': the budget {t.limits} cannot be met with only the "
                                  f"{len(groups)} block-internal groups pruned, even at one unit each; raise the "
                                  "budget or use scope='all'")
        ctx.module, self.gates = insert_gates(ctx.traced, ctx.graph, gate_factory=self.make_gate, groups=groups)
        self.lam = AdaptiveWeight(self.options.lam, self.options.lam_rate, ctx.total_steps)

    def parameters(self, ctx: Context) -> list[torch.nn.Parameter]:
        return list(self.nets.parameters())

    def allowed(self, ctx: Context) -> float:
        """T(t): the budget's primary resource allowed at this step (dense -> limit over ``search``)."""
        o, t, total = self.options, ctx.targets, ctx.total_steps
        done = progress(ctx.step, o.warmup * total, o.search * total)
        return float(linear_path(t.dense[t.primary], t.limits[t.primary], done))

    def loss(self, ctx: Context) -> torch.Tensor | None:
        if ctx.step < self.options.warmup * ctx.total_steps:
            return None
        cost = ctx.cost.resource(ctx.targets.primary)({gid: g.values() for gid, g in self.gates.items()})
        return self.lam.value * torch.relu(cost / self.allowed(ctx) - 1.0)

    def binary(self) -> dict[int, np.ndarray]:
        """The gates' forward values as keep masks."""
        with torch.no_grad():
            return {gid: (g.values() > 0).numpy() for gid, g in self.gates.items()}

    def after_step(self, ctx: Context) -> None:
        """Grow lam while the binary gates cost more than T(t), shrink it back towards its start
        otherwise; then hold units open so the cut follows T(t)."""
        if ctx.step < self.options.warmup * ctx.total_steps:
            return
        with torch.no_grad():
            open_ = {gid: (g.scores() >= 0).numpy() for gid, g in self.gates.items()}
        self.lam.update(grow=float(ctx.cost.resource(ctx.targets.primary)(open_)) > self.allowed(ctx))
        self.hold_open(ctx)

    def hold_open(self, ctx: Context) -> None:
        """Hold the best closed units open while closing them all would cut below T(t): the cut
        follows the path from above and never overshoots it (GDP zeroes only what its path needs)."""
        t = ctx.targets
        keep = allocate(ctx.cost, replace(t, limits={t.primary: self.allowed(ctx)}, round_to=1), self.ranking())
        for gid, g in self.gates.items():
            g.floor = torch.as_tensor(keep[gid]) & (g.scores().detach() < 0)

    def state_dict(self) -> dict[str, Any]:
        return {"lam": self.lam.value, "floor": {gid: g.floor.clone() for gid, g in self.gates.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lam.value = float(state["lam"])
        for gid, floor in state["floor"].items():
            self.gates[gid].floor = floor.clone()

    def ranking(self) -> dict[int, np.ndarray]:
        """Every open gate above every closed one, each side ordered by its score relative to its
        group's extreme (open: s / max s in (1, 2]; closed: 1 - s / min s in [0, 1)): ``allocate``
        then closes the fewest units, lowest first, to meet a limit. Raw scores are pushed in
        proportion to a unit's cost, so they are not comparable across groups."""
        with torch.no_grad():
            scores = {gid: g.scores().double().numpy() for gid, g in self.gates.items()}
        return {gid: np.where(s >= 0, 1 + s / max(s.max(), 1e-12), 1 - s / min(s.min(), -1e-12))
                for gid, s in scores.items()}

    def decide(self, ctx: Context, data: Any = None) -> Decision:
        """The open gates, filled up to the budget with the best closed units, or cut down to it
        by score if training ended above it."""
        return Decision(allocate(ctx.cost, ctx.targets, self.ranking()))

    def schedule(self, ctx: Context) -> dict[str, float]:
        keep = self.binary()
        return {"kept_fraction": float(np.mean([k.mean() for k in keep.values()])) if keep else 1.0,
                "lam": self.lam.value, ctx.targets.primary: float(ctx.cost.resource(ctx.targets.primary)(keep)),
                "allowed": self.allowed(ctx)}

    def report(self, ctx: Context) -> dict[str, Any]:
        keep = self.binary()
        return {"gate_parameters": sum(p.numel() for p in self.nets.parameters()), "scope": self.options.scope,
                "searched": float(ctx.cost.resource(ctx.targets.primary)(keep)) / ctx.targets.limits[ctx.targets.primary],
                "kept_by_gates": {gid: float(k.mean()) for gid, k in keep.items()}}
