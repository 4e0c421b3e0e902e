"""einops rearrange/reduce (issue 30): the channel axis followed through the pattern."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxprune
from test_capture import build
from test_spine_zoo import prune_and_check

einops = pytest.importorskip("einops")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Tokens(nn.Module):
    """Channels moved last by rearrange (spatial axes merged), pooled by reduce over space."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.mix = nn.Conv2d(8, 12, 1)
        self.fc, self.head = nn.Linear(8, 4), nn.Linear(12, 4)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        tokens = einops.rearrange(y, "b c (h p) w -> b (h w) p c", p=2)
        pooled = einops.reduce(self.mix(y), "b c h w -> b c", "mean")
        return self.fc(tokens).mean((1, 2)) + self.head(pooled)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rearrange_and_reduce_move_the_channels_and_prune_exactly(seed):
    model, x = build(Tokens, 8)
    gm = fxprune.trace(model, (x,))
    assert sum(n.target is einops.rearrange for n in gm.graph.nodes) == 1  # one node, not einops' internals
    res = prune_and_check(model, x, gm, seed=seed)
    assert res["fin"].fc.in_features == res["fin"].conv.out_channels


@pytest.mark.parametrize("pattern, sizes, reason", [
    ("b (g c) h w -> b g c h w", {"g": 2}, "splits the channels"),
    ("b c h w -> b (c h) w", {}, "merges the channels"),
    ("b c h w -> b c h w", {"c": 8}, "literal size"),
])
def test_patterns_that_would_not_follow_the_pruned_width_block(pattern, sizes, reason):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)

        def forward(self, x):
            return einops.rearrange(self.conv(x), pattern, **sizes).sum()

    cg = fxprune.analyze(fxprune.trace(Net(), (torch.randn(1, 3, 4, 4),)))
    group = next(g for g in cg.groups if g.size == 8)
    assert not group.prunable and reason in group.reason
