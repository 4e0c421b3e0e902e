"""TPP: Trainability Preserving Pruning (Wang & Fu, ICLR 2023), METHODS.md §8.3.

The skeleton is GReg-1's (P fixed by filter L1, lam growing linearly on P's filters, then
stabilize, prune, fine-tune); TPP adds two terms that keep the network trainable
while P is driven to zero (official code, github.com/MingSun-Tse/TPP, ``--opp_scheme v5``):

- a Gram-matrix regularizer per producer layer. With W the layer's filters flattened to
  [C_out, -1] and G = W W^T,

      L_TPP = opp_weight * max_j lam_j(t) * mean((G - sg[G with the rows and columns of P zeroed])^2)

  where sg stops the gradient. Its gradient drives the inner products of pruned filters with
  every filter (themselves included) to zero: pruned filters shrink *and* kept filters
  decorrelate from them, so removing P later changes little of what the kept ones compute;
- the growing lam is applied to the pruned filters' weights and biases (``--weight_reg``) and to
  the scale and shift (gamma, beta) of their norms (``--bn_reg``), so a pruned channel's BN output
  also goes to zero;
- lam grows linearly (``_greg_1``: delta per ``interval`` iterations) to ``tau``; unlike GReg-1
  there is no magnitude-ratio stop, so growth lasts the full 100k iterations;
- during stabilize, layer by layer zero-out (``_layerwise_zero_out``): the pruned rows of the i-th
  layer (in the graph's layer order) and their norms' gamma and beta are set to zero from
  (i + 1) * ``zero_out_interval`` = 100 iterations after stabilize starts on, every step; official
  stabilize is 10,000 iterations, which must cover every layer's turn (the official code exits
  otherwise; here a ``ConfigError``).

Schedule, clock and penalty as GReg-1 (see ``greg``: the official CIFAR iteration counts laid over
the run, the penalty as the repeated per-iteration factor). The Gram term goes through the run's
optimizer with weight ``opp_weight`` (``--lw_opp`` 1000) times max lam ([A]: its per-iteration
strength at the run's rate, not compressed). ``opp_weight=0`` leaves the BN penalty and zero-out
alone (the ablation arm).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fxprune.errors import ConfigError
from fxprune.method import Context, register_method
from fxprune.passes.methods.greg import GReg1, GRegOptions, Rows, producer_rows
from fxprune.rules.base import gate_anchor, rule_for


@dataclass(frozen=True)
class TPPOptions(GRegOptions):
    opp_weight: float = 1000.0
    zero_out_interval: int = 100


def norm_rows(ctx: Context) -> list[Rows]:
    """The affine parameters (gamma, beta) of the norm right after each prunable group's
    producers: the ones a gate there would fold into (the norm's op rule lists them)."""
    gm, modules = ctx.module, dict(ctx.module.named_modules())
    layers = {l.node: i for i, l in enumerate(ctx.graph.layers)}
    nodes = {n.name: n for n in gm.graph.nodes}
    out = []
    for g in ctx.graph.prunable_groups:
        for site in g.sites:
            node = nodes.get(site.node)
            anchor = gate_anchor(gm, node, modules) if node is not None else None
            if anchor is None or anchor is node:
                continue
            units = torch.as_tensor(site.units, dtype=torch.long)
            out += [Rows(q, dim, g.id, units, layers.get(site.node, -1))
                    for q, dim in rule_for(anchor, modules).gate_params(gm, anchor)]
    return out


@register_method
class TPP(GReg1):
    """Trainability Preserving Pruning: GReg-1's skeleton plus the Gram-matrix and BN regularizers."""

    name = "tpp"
    Options = TPPOptions
    ratio_stop = False

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.options.zero_out_interval < 1:
            raise ConfigError("tpp: zero_out_interval must be >= 1 (official iterations between two layers' zero-out)")
        self.extra_rows: list[Rows] = []
        self.stabilize_from: float | None = None  # official iteration at which stabilize began
        self.turns = 0                             # layers whose zero-out turn has come

    def prepare(self, ctx: Context) -> None:
        super().prepare(ctx)
        self.rows = producer_rows(ctx)
        weights = {r.qualname for r in self.rows}
        self.extra_rows = [r for r in producer_rows(ctx, with_bias=True) if r.qualname not in weights] + norm_rows(ctx)
        last = max((r.layer for r in self.rows), default=-1) + 1
        if self.options.stabilize < self.options.zero_out_interval * last:
            raise ConfigError(f"tpp: stabilize={self.options.stabilize} iterations cannot zero out {last} layers one per "
                              f"zero_out_interval={self.options.zero_out_interval}; raise stabilize to at least "
                              f"{self.options.zero_out_interval * last}")

    def penalized_rows(self) -> list[Rows]:
        return self.rows + self.extra_rows

    def loss(self, ctx: Context) -> torch.Tensor | None:
        lam_max = self.lam_max()
        if not self.pruned or lam_max == 0 or self.options.opp_weight == 0:
            return None
        total = torch.zeros(())
        for r in self.rows:
            pruned = torch.as_tensor(self.pruned[r.group])[r.units]
            if not pruned.any():
                continue
            w = ctx.module.get_parameter(r.qualname)
            filters = w.movedim(r.dim, 0).reshape(w.shape[r.dim], -1)
            gram = filters @ filters.t()
            target = gram.detach().clone()
            target[pruned] = 0.0
            target[:, pruned] = 0.0
            total = total + ((gram - target) ** 2).mean()
        return self.options.opp_weight * lam_max * total

    def after_step(self, ctx: Context) -> None:
        super().after_step(ctx)
        if self.phase != "stabilize":
            return
        now = self.clock.at(ctx.step - self.begin)
        if self.stabilize_from is None:
            self.stabilize_from = now - self.clock.per_step  # the official iteration growth ended in
        self.turns = int((now - self.stabilize_from) // self.options.zero_out_interval)
        self.zero_out(ctx, self.turns)

    def zero_out(self, ctx: Context, turns: int) -> None:
        """Layers 0 .. turns - 1 have had their turn: their pruned rows (and norms) become zero."""
        with torch.no_grad():
            for r in self.penalized_rows():
                pruned = torch.as_tensor(self.pruned[r.group])[r.units]
                if r.layer < turns and pruned.any():
                    p = ctx.module.get_parameter(r.qualname)
                    p.index_fill_(r.dim, torch.nonzero(pruned).flatten(), 0.0)

    def report(self, ctx: Context) -> dict[str, Any]:
        return {**super().report(ctx), "zero_out_turns": self.turns}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "stabilize_from": self.stabilize_from, "turns": self.turns}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.stabilize_from, self.turns = state["stabilize_from"], int(state["turns"])
