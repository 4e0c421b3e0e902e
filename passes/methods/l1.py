"""L1-norm filter pruning (Li et al., ICLR 2017), on channel groups with a global allocation.

Importance of a unit is the L1 norm of every filter that produces it, summed over the group's
producers (a residual stream's channel is produced by several convs). To rank units of
different groups against each other, each group's scores are divided by their mean; then
``allocate`` removes the lowest-ranked units until the budget holds exactly (the paper used
hand-set per-stage ratios instead; a global ranking under the cost model is this library's
choice, so one budget fits every architecture).
"""
from __future__ import annotations

import numpy as np

from fxprune.budget import allocate
from fxprune.passes.methods.base import Method


def producer_l1(gm, cg, group) -> np.ndarray:
    """Sum over the group's producers of |W| per output filter, accumulated per unit."""
    scores = np.zeros(group.size)
    nodes = {n.name: n for n in gm.graph.nodes}
    layers = {l.node: l for l in cg.layers}
    for site in group.sites:
        layer = layers.get(site.node)
        if layer is None or site.node not in nodes:
            continue
        w = gm.get_parameter(layer.weight).detach().abs()
        out_dim = 1 if layer.kind == "conv_transpose" else 0
        norms = w.movedim(out_dim, 0).reshape(w.shape[out_dim], -1).sum(1).double().numpy()
        np.add.at(scores, site.units, norms)
    return scores


class L1Norm(Method):
    """Rank units by filter L1 norm; no training of its own (fine-tune afterwards)."""

    name = "l1"

    def decide(self) -> dict[int, np.ndarray]:
        scores = {}
        for g in self.cg.prunable_groups:
            s = producer_l1(self.gated, self.cg, g)
            scores[g.id] = s / max(s.mean(), 1e-12)
        keep = allocate(self.cost, self.targets, scores)
        self.apply_keep(keep)
        return keep
