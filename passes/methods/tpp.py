"""TPP: Trainability Preserving Pruning (Wang & Fu, ICLR 2023), METHODS.md §8.3.

The skeleton is GReg-1's (P fixed by filter L1, lam growing linearly on P's filters through the
gradient, then stabilize, prune, fine-tune); TPP adds two terms that keep the network trainable
while P is driven to zero (official code, github.com/MingSun-Tse/TPP, ``--opp_scheme v5``):

- a Gram-matrix regularizer per producer layer. With W the layer's filters flattened to
  [C_out, -1] and G = W W^T,

      L_TPP = opp_weight * max_j lam_j(t) * mean((G - sg[G with the rows and columns of P zeroed])^2)

  where sg stops the gradient. Its gradient drives the inner products of pruned filters with
  every filter (themselves included) to zero: pruned filters shrink *and* kept filters
  decorrelate from them, so removing P later changes little of what the kept ones compute;
- BN regularization: the same growing lam is added to the gradients of the scale and shift
  (gamma, beta) of the pruned channels' norms, so a pruned channel's BN output also goes to zero.
- At the start of the stabilize phase the pruned filters (and their norms' gamma and beta) are
  set to zero. The official code zeroes one layer every 100 iterations; runs here are a few
  hundred steps, so all layers are zeroed at once (this library's choice [A]).

Defaults: ``opp_weight`` 1000 (``--lw_opp``); schedule and allocation as GReg-1 (see ``greg``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fxprune.method import Context, register_method
from fxprune.passes.methods.greg import GReg1, GRegOptions, Rows
from fxprune.rules.base import gate_anchor, rule_for


@dataclass(frozen=True)
class TPPOptions(GRegOptions):
    opp_weight: float = 1000.0


def norm_rows(ctx: Context) -> list[Rows]:
    """The affine parameters (gamma, beta) of the norm right after each prunable group's
    producers: the ones a gate there would fold into (the norm's op rule lists them)."""
    gm, modules = ctx.module, dict(ctx.module.named_modules())
    nodes = {n.name: n for n in gm.graph.nodes}
    out = []
    for g in ctx.graph.prunable_groups:
        for site in g.sites:
            node = nodes.get(site.node)
            anchor = gate_anchor(gm, node, modules) if node is not None else None
            if anchor is None or anchor is node:
                continue
            units = torch.as_tensor(site.units, dtype=torch.long)
            out += [Rows(q, dim, g.id, units) for q, dim in rule_for(anchor, modules).gate_params(gm, anchor)]
    return out


@register_method
class TPP(GReg1):
    """Trainability Preserving Pruning: GReg-1 plus the Gram-matrix and BN regularizers."""

    name = "tpp"
    Options = TPPOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.zeroed = False
        self.norm_rows: list[Rows] = []

    def prepare(self, ctx: Context) -> None:
        super().prepare(ctx)
        self.norm_rows = norm_rows(ctx)

    def loss(self, ctx: Context) -> torch.Tensor | None:
        if not self.pruned:
            return None
        lam_max = max(float(l.max()) for l in self.lam.values())
        if lam_max == 0:
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

    def after_backward(self, ctx: Context) -> None:
        self.penalize(ctx, self.rows + self.norm_rows)

    def after_step(self, ctx: Context) -> None:
        super().after_step(ctx)
        if self.pruned and not self.growing and not self.zeroed:
            self._zero_out(ctx)

    def _zero_out(self, ctx: Context) -> None:
        """Stabilize starts: pruned filters and their norms' affine parameters become zero."""
        with torch.no_grad():
            for r in self.rows + self.norm_rows:
                pruned = torch.as_tensor(self.pruned[r.group])[r.units]
                if pruned.any():
                    p = ctx.module.get_parameter(r.qualname)
                    p.index_fill_(r.dim, torch.nonzero(pruned).flatten(), 0.0)
        self.zeroed = True

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "zeroed": self.zeroed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.zeroed = bool(state["zeroed"])
