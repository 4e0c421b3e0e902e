"""LAP: lookahead pruning (Park, Lee, Mo, Shin; ICLR 2020), METHODS.md §8.2.

Score of weight W_l[i, j]: W_l[i, j]^2 x ||W_{l-1}[j, :]||^2 x ||W_{l+1}[:, i]||^2, so a weight
whose input channel is produced by small filters, or whose output channel is read by small
weights, goes first (``fxprune.sparsity.lookahead_scores``). The neighbours come from the channel
graph: every layer producing or reading a channel of the same group counts (a residual stream's
channel sums all its producers and readers), which the paper's sequential-layer code cannot
express. Pruned weights score 0 (their magnitude is 0), so masks only grow.

Defaults follow the paper's one-shot mode (``begin = end = 0.5``: prune a half-trained model
once, then fine-tune with the mask fixed); ``begin < end`` uses LAP as the criterion of the
gradual cubic schedule instead (the schedule of ``gmp``). The BN-weighted variant (``lap_bn``)
is not implemented: the score reads the conv/linear weights only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fxprune import sparsity as sp
from fxprune.method import Context, register_method
from fxprune.passes.methods.sparse import ScheduleOptions, WeightMethod


@dataclass(frozen=True)
class LAPOptions(ScheduleOptions):
    begin: float = 0.5
    end: float = 0.5


@register_method
class LAP(WeightMethod):
    """Magnitude times the squared norms of the previous and next layers' connected weights."""

    name = "lap"
    Options = LAPOptions
    score_name = "lookahead"

    def scores(self, ctx: Context) -> dict[str, torch.Tensor]:
        params = dict(ctx.traced.named_parameters())
        weights = {l.weight: self.masks[l.weight].effective() if l.weight in self.masks else params[l.weight].detach()
                   for l in ctx.graph.layers if l.weight in params}
        lap = sp.lookahead_scores(weights, ctx.graph)
        return {name: lap[name] for name in self.masks}
