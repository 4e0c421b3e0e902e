"""einsum (issue 30): channels followed letter by letter, exact under random gates and scales."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxprune
from test_capture import build
from test_spine_zoo import prune_and_check

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Permuted(nn.Module):
    """Channels-first to channels-last by einsum, scaled per channel by a stored vector."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.scale = nn.Parameter(torch.rand(8) + 0.5)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        y = torch.einsum("bchw,c->bchw", y, self.scale)
        return self.fc(torch.einsum("b c h w -> b h w c", y)).mean((1, 2))


class Attention(nn.Module):
    """q @ k and attn @ v written as einsum: the q/k width is summed out between two tracked
    operands, the v width passes to the output."""

    def __init__(self, dim: int = 12) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 2, 2)
        self.q, self.k, self.v = nn.Linear(dim, 8), nn.Linear(dim, 8), nn.Linear(dim, 6)
        self.out = nn.Linear(6, 5)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        attn = torch.einsum("bnd,bmd->bnm", self.q(t), self.k(t)).softmax(-1)
        return self.out(torch.einsum("bnm,bm...->bn...", attn, self.v(t))).mean(1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_einsum_permute_and_per_channel_factor_prune_exactly(seed):
    model, x = build(Permuted, 8)
    res = prune_and_check(model, x, seed=seed)
    kept = res["fin"].conv.out_channels
    assert res["fin"].scale.shape == (kept,) and res["fin"].fc.in_features == kept


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_einsum_attention_prunes_the_qk_and_v_widths(seed):
    model, x = build(Attention, 8)
    cg = fxprune.analyze(fxprune.trace(model, (x,)))
    sizes = sorted(g.size for g in cg.prunable_groups)
    assert 8 in sizes and 6 in sizes  # q and k coupled into one group of 8; v its own
    qk = next(g for g in cg.prunable_groups if g.size == 8)
    assert {s.node for s in qk.sites} >= {"q", "k"}
    res = prune_and_check(model, x, seed=seed)
    assert res["fin"].q.out_features == res["fin"].k.out_features


@pytest.mark.parametrize("equation, reason", [("bchw->bhw", "sums over the channels of one operand"),
                                              ("bchw,dc->bdhw", "untracked tensor")])
def test_einsum_refuses_what_would_change_the_value(equation, reason):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.w = nn.Conv2d(3, 8, 1), nn.Parameter(torch.randn(4, 8))

        def forward(self, x):
            y = self.conv(x)
            return torch.einsum(equation, y, self.w) if "," in equation else torch.einsum(equation, y)

    cg = fxprune.analyze(fxprune.trace(Net(), (torch.randn(1, 3, 4, 4),)))
    group = next(g for g in cg.groups if g.size == 8)
    assert not group.prunable and reason in group.reason and "einsum" in group.reason
