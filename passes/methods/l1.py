"""L1-norm filter pruning (Li et al., ICLR 2017), on channel groups with a global allocation.

Importance of a unit is the L1 norm of every filter that produces it, summed over the group's
producers (a residual stream's channel is produced by several convs; ``fxprune.scores``). To
rank units of different groups against each other, each group's scores are divided by their
mean; then ``allocate`` removes the lowest-ranked units until the budget holds exactly (the
paper used hand-set per-stage ratios instead; a global ranking under the cost model is this
library's choice, so one budget fits every architecture). ``score`` picks another criterion of
``fxprune.scores`` (l2, bn_scale, fpgm, taylor, random) with the same allocation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fxprune import scores
from fxprune.budget import allocate
from fxprune.decision import Decision
from fxprune.method import Context, Method, register_method


@dataclass(frozen=True)
class L1Options:
    score: str = "l1"


@register_method
class L1Norm(Method):
    """Rank units by filter L1 norm (or ``score``); no training of its own (fine-tune afterwards)."""

    name = "l1"
    Options = L1Options

    def decide(self, ctx: Context, data: Any = None) -> Decision:
        ranked = scores.group_scores(self.options.score, ctx.module, ctx.graph, data)
        return Decision(allocate(ctx.cost, ctx.targets, ranked))
