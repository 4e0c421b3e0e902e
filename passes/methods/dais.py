"""DAIS: Differentiable Annealing Indicator Search (Guan et al., TNNLS 2023), see METHODS.md §5.

Per unit an architecture parameter alpha and a relaxed indicator I = sigmoid(alpha / T), one
vector per channel group (shared by every producer of the group: a residual stream's channels are
decided together), applied as a gate after the producers' norm. The temperature anneals as
T = 1 / (1 + (1/T_end - 1) * progress), from 1 to ``t_end`` (Broggi's form, 1 -> 0.02 by default),
so the indicators become the step 1[alpha > 0] and the continuous model becomes the binarized one.

Bi-level search, first-order as in DARTS; the method owns the training step (``train_step``):
each batch is split by example into a weight part and an indicator part, a fraction
``indicator_split`` of the training examples, chosen by a hash of the example's own values, so an
example always falls on the same side in every epoch and the two splits never share one. Per batch:
one weight step on the task loss of the weight part (indicators' gradients dropped), then one
indicator step on the indicator part's task loss + ``l1`` * mean indicator (Eq. 8) +
``lam`` * |log(R(I) / R*)| (Eq. 10), where R is the budget's primary resource evaluated on the
soft indicators through the shared cost model (the bilinear expected FLOPs of Eq. 9, or the
latency predictor under a latency budget) and R* the budget.

Choices that are this library's [A] (only the abstract and a third-party re-implementation were
reachable, METHODS.md §5):
- the FLOPs regularizer is |log(R / R*)|: zero on the budget, the same gradient magnitude as the
  re-implementation's one-sided +-log R away from it, and it holds the budget instead of
  overshooting it; its weight (``fxprune.schedules.AdaptiveWeight``) starts at ``lam`` and grows
  by ``1 + lam_rate`` per 1% of training
  while the binarized indicators cost more than the budget (GDP's adaptive lambda), shrinking
  back otherwise: with a fixed weight a 3-epoch run ended at 136% of its FLOPs budget;
- that weight is bounded by ``lam_max`` = 100: alpha is trained by Adam, which normalizes the
  gradient's scale, so once the budget term dominates the task term further growth changes the
  step little, while shrinking back takes as long as growing did (a hysteresis: unbounded, 1.2 per
  1% compounds to 8e7 over a run that never meets the budget). A 6-epoch run at 25% FLOPs
  (resnet20/digits) peaked near 60 at an epoch end and met the budget, so the bound leaves it as is;
- the residual-structure regularizer (Eq. 11) ties the indicators of channels joined by shortcuts;
  here such channels *are* one channel group with one indicator vector, so the tie holds exactly by
  construction and no extra term is added;
- alpha starts at ``init`` = 1 (every indicator at sigmoid(1) = 0.73 at T = 1, above the 0.5
  decision line) and is trained by the method's own Adam (``alpha_lr`` = 0.05), as DARTS trains
  its architecture parameters with Adam: the per-unit gradient of the FLOPs term is ~1e-3 and
  shrinks with sigmoid'(alpha / T) / T as T anneals, so plain SGD at the flow's gate rate left every
  alpha where it started (fxprune's first run: 100% of the FLOPs after 8 epochs, then a random
  allocation at decide);
- the split is by content hash, 30% to the indicators (the re-implementation's 70/30);
- decide: indicator > 0.5 is kept, its soft value folded exactly into the producers; if the search
  ends above the budget the units with the lowest alpha relative to their group's largest go until
  it holds (``fxprune.budget.allocate``); widths round down to ``round_to``; a group keeps at least
  one unit.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fxprune.budget import allocate
from fxprune.decision import Decision
from fxprune.errors import ConfigError
from fxprune.ir import ChannelGroup
from fxprune.method import Context, register_method
from fxprune.passes.gates import Gate
from fxprune.passes.methods.gated import GateMethod, round_down
from fxprune.schedules import AdaptiveWeight


@dataclass(frozen=True)
class DAISOptions:
    t_end: float = 0.02  # final temperature of sigmoid(alpha / T)
    init: float = 1.0  # alpha at the start
    lam: float = 1.0  # starting weight of |log(R / R*)|
    lam_rate: float = 0.2  # lam grows by 1 + lam_rate per 1% of training while the binarized cost is above budget
    lam_max: float = 100.0  # lam's ceiling (Adam on alpha: beyond it growth adds only hysteresis)
    l1: float = 1e-3  # weight of the mean indicator (Eq. 8)
    indicator_split: float = 0.3  # fraction of the training examples that train the indicators
    alpha_lr: float = 0.05  # Adam's rate for alpha (DARTS: Adam for the architecture parameters)


class DAISGate(Gate):
    """sigmoid(alpha / T): ``weight`` holds alpha, ``temperature`` is set by the method."""

    def __init__(self, size: int, group_id: int, init: float) -> None:
        super().__init__(size, group_id, init)
        self.register_buffer("temperature", torch.tensor(1.0))

    def values(self) -> torch.Tensor:
        return torch.sigmoid(self.weight / self.temperature)


def indicator_rows(inputs: torch.Tensor, fraction: float) -> torch.Tensor:
    """Which examples of a batch belong to the indicator split: a hash of each example's bytes,
    so the assignment depends on the example alone (not on the batch, the order or the epoch)."""
    flat = inputs.detach().cpu().contiguous().reshape(len(inputs), -1).numpy()
    cut = int(fraction * 2**32)
    return torch.tensor([int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=4).digest(), "little") < cut
                         for row in flat], dtype=torch.bool)


@register_method
class DAIS(GateMethod):
    """Annealed relaxed indicators searched bi-level (weights / indicators on disjoint examples)."""

    name = "dais"
    Options = DAISOptions
    needs_training = True
    needs_total_steps = True

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.alpha_opt: torch.optim.Adam | None = None
        self.lam_weight: AdaptiveWeight | None = None  # lam's schedule, made once total_steps is known
        o = self.options
        if not 0 < o.t_end <= 1 or not 0 < o.indicator_split < 1:
            raise ConfigError(f"method 'dais': need 0 < t_end <= 1 and 0 < indicator_split < 1, got t_end={o.t_end}, "
                              f"indicator_split={o.indicator_split}")
        if o.lam_max < o.lam:
            raise ConfigError(f"method 'dais': lam_max={o.lam_max} is below the starting lam={o.lam}; "
                              "set lam_max >= lam (it is lam's ceiling)")

    @property
    def lam(self) -> float:
        """The FLOPs regularizer's current weight (``options.lam`` before ``prepare``; lam=0: off)."""
        return self.lam_weight.value if self.lam_weight is not None else self.options.lam

    def make_gate(self, group: ChannelGroup) -> Gate:
        return DAISGate(group.size, group.id, self.options.init)

    def temperature(self, ctx: Context) -> float:
        return 1.0 / (1.0 + (1.0 / self.options.t_end - 1.0) * min(ctx.progress, 1.0))

    def prepare(self, ctx: Context) -> None:
        super().prepare(ctx)
        o = self.options
        self.alpha_opt = torch.optim.Adam(self.parameters(ctx), lr=o.alpha_lr)
        if o.lam > 0:  # never below its start
            self.lam_weight = AdaptiveWeight(o.lam, o.lam_rate, ctx.total_steps, ceiling=o.lam_max)
        self._anneal(ctx)

    def _anneal(self, ctx: Context) -> None:
        t = self.temperature(ctx)
        for gate in self.gates.values():
            gate.temperature.fill_(t)

    def regularizer(self, ctx: Context) -> torch.Tensor:
        """l1 * mean indicator + lam * |log(R(I) / R*)| on the soft indicators."""
        soft = {gid: g.values() for gid, g in self.gates.items()}
        name = ctx.targets.primary
        cost = ctx.cost.resource(name)(soft)
        mean = torch.cat([v for v in soft.values()]).mean()
        return self.options.l1 * mean + self.lam * torch.log(cost / float(ctx.targets.limits[name])).abs()

    def train_step(self, ctx: Context, batch: Any, optimizer: torch.optim.Optimizer) -> tuple[Any, torch.Tensor]:
        """One weight step (``optimizer``) on the batch's weight split, then one indicator step (the
        method's own Adam on alpha) on its indicator split; returns the logits of the whole batch
        (for the loop's accuracy) and the weight split's task loss."""
        inputs, targets = batch
        pick = ctx.output or (lambda out: out)
        task = ctx.task_loss or torch.nn.functional.cross_entropy
        alphas = {id(p) for p in self.parameters(ctx)}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        side = indicator_rows(inputs, self.options.indicator_split).to(inputs.device)
        logits: dict[bool, Any] = {}
        shown = None
        for indicator in (False, True):
            rows = side if indicator else ~side
            step = self.alpha_opt if indicator else optimizer
            optimizer.zero_grad(set_to_none=True)
            self.alpha_opt.zero_grad(set_to_none=True)
            loss = self.regularizer(ctx) if indicator else None
            if rows.any():
                logits[indicator] = pick(ctx.module(inputs[rows]))
                task_loss = task(logits[indicator], targets[rows])
                loss = task_loss if loss is None else loss + task_loss
                shown = task_loss if shown is None or not indicator else shown
            if loss is None:
                continue
            loss.backward()
            for p in params:  # each step moves only its own side's parameters
                if (id(p) in alphas) != indicator:
                    p.grad = None
            step.step()
        optimizer.zero_grad(set_to_none=True)
        self.alpha_opt.zero_grad(set_to_none=True)
        return _merge(logits, side), shown.detach()

    def after_step(self, ctx: Context) -> None:
        """Anneal T; grow lam while the binarized indicators cost more than the budget (shrink it
        back towards its start otherwise)."""
        self._anneal(ctx)
        if self.lam_weight is not None:
            keep = {gid: v > 0.5 for gid, v in self.indicators().items()}
            self.lam_weight.update(grow=not ctx.targets.met(ctx.cost, keep))

    def state_dict(self) -> dict[str, Any]:
        return {"alpha_opt": self.alpha_opt.state_dict(), "lam": self.lam} if self.alpha_opt is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.alpha_opt.load_state_dict(state["alpha_opt"])
            if self.lam_weight is not None:
                self.lam_weight.value = float(state["lam"])

    def indicators(self) -> dict[int, np.ndarray]:
        with torch.no_grad():
            return {gid: g.values().double().numpy() for gid, g in self.gates.items()}

    def decide(self, ctx: Context, data: Any = None) -> Decision:
        values = self.indicators()
        keep = {gid: v > 0.5 for gid, v in values.items()}
        for gid, mask in keep.items():
            if not mask.any():
                mask[int(np.argmax(values[gid]))] = True
        keep = round_down(keep, values, ctx.targets.round_to)
        if not ctx.targets.met(ctx.cost, keep):  # the search ended above budget: rank by alpha within groups
            alphas = {gid: g.weight.detach().double().numpy() for gid, g in self.gates.items()}
            keep = allocate(ctx.cost, ctx.targets,
                            {gid: 1 + a / max(float(np.abs(a).max()), 1e-12) for gid, a in alphas.items()})
        scale = {gid: torch.as_tensor(v, dtype=torch.float32) for gid, v in values.items()}
        return Decision(keep, scale)

    def schedule(self, ctx: Context) -> dict[str, float]:
        values = np.concatenate(list(self.indicators().values())) if self.gates else np.ones(1)
        keep = {gid: v > 0.5 for gid, v in self.indicators().items()}
        return {"T": self.temperature(ctx), "lam": self.lam, "undecided": float(((values > 0.05) & (values < 0.95)).mean()),
                ctx.targets.primary: float(ctx.cost.resource(ctx.targets.primary)(keep))}

    def report(self, ctx: Context) -> dict[str, Any]:
        values = np.concatenate(list(self.indicators().values())) if self.gates else np.ones(1)
        return {"temperature": self.temperature(ctx),
                "undecided_fraction": float(((values > 0.05) & (values < 0.95)).mean())}


def _merge(logits: dict[bool, Any], side: torch.Tensor) -> Any:
    """The two splits' logits back in batch order (tensors only; otherwise the weight split's)."""
    parts = [v for v in logits.values()]
    if not all(isinstance(v, torch.Tensor) for v in parts):
        return logits.get(False, parts[0])
    full = parts[0].new_empty((len(side), *parts[0].shape[1:]))
    for indicator, v in logits.items():
        full[side if indicator else ~side] = v.detach()
    return full
