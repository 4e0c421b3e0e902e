"""Reductions over the channels (issue 30): exact where removed channels are zero (GRN)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from test_capture import build
from test_spine_zoo import RTOL, prune_and_check, rel_diff

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class GRN(nn.Module):
    """ConvNeXt-V2's global response norm, channels last, as Hugging Face writes it."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(1, 1, 1, dim) + 0.5)
        self.bias = nn.Parameter(torch.randn(1, 1, 1, dim))

    def forward(self, x):
        gx = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.weight * (x * nx) + self.bias + x


class ConvNeXtV2Block(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, dim, 2, 2), nn.BatchNorm2d(dim)
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.fc1, self.grn, self.fc2 = nn.Linear(dim, 4 * dim), GRN(4 * dim), nn.Linear(4 * dim, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.bn(self.stem(x))
        y = self.fc2(self.grn(F.gelu(self.fc1(self.dw(x).permute(0, 2, 3, 1))))).permute(0, 3, 1, 2)
        return self.head((x + y).mean((2, 3)))


class ChannelStats(nn.Module):
    """``reduce`` of a conv's activated output over the channels scales the output."""

    def __init__(self, reduce) -> None:
        super().__init__()
        self.conv, self.bn, self.out = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)
        self.reduce = reduce

    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.out(y * self.reduce(y).unsqueeze(1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grn_hidden_width_prunes_exactly_with_the_dense_mean(seed):
    model, x = build(ConvNeXtV2Block, 8)
    cg = fxprune.analyze(fxprune.trace(model, (x,)))
    hidden = next(g for g in cg.groups if g.size == 32)
    assert hidden.prunable, hidden.reason
    res = prune_and_check(model, x, seed=seed)
    kept = res["fin"].fc1.out_features
    assert res["fin"].grn.weight.shape[-1] == kept == res["fin"].fc2.in_features
    x2 = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        assert rel_diff(res["fin"](x2), res["gated"](x2)) <= 10 * RTOL


@pytest.mark.parametrize("reduce", [lambda y: torch.relu(y).mean(1), lambda y: torch.relu(y).sum(1),
                                    lambda y: torch.relu(y).norm(2, 1)])
def test_mean_sum_and_norm_over_zero_removed_channels_are_exact(reduce):
    model, x = build(lambda: ChannelStats(reduce), 8)
    prune_and_check(model, x, seed=3)


@pytest.mark.parametrize("reduce, why", [(lambda y: torch.sigmoid(y).mean(1), "not known to be zero"),
                                         (lambda y: y.amax(1), "over the channel dim")])
def test_reductions_where_removed_channels_would_count_block(reduce, why):
    model, x = build(lambda: ChannelStats(reduce), 8)
    cg = fxprune.analyze(fxprune.trace(model, (x,)))
    group = next(g for g in cg.groups if g.size == 8)
    assert not group.prunable and why in group.reason


class LayerNormCF(nn.LayerNorm):
    """timm's LayerNorm2d: channels first, normalized over the channels by F.layer_norm."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class TinyConvNeXt(nn.Module):
    """Stem with a channels-first LayerNorm, a block with a channels-last LayerNorm and a layer
    scale ``gamma.reshape(1, -1, 1, 1)``, a token-style head norm: the stream's channels are
    normalized three times."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.stem, self.stem_norm = nn.Conv2d(3, dim, 2, 2), LayerNormCF(dim)
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)
        self.head_norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 5)

    def forward(self, x):
        x = self.stem_norm(self.stem(x))
        y = self.fc2(F.gelu(self.fc1(self.norm(self.dw(x).permute(0, 2, 3, 1))))).permute(0, 3, 1, 2)
        x = x + y * self.gamma.reshape(1, -1, 1, 1)
        return self.head(self.head_norm(x.mean((2, 3))))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_layer_norms_over_the_stream_prune_exactly_with_dense_statistics(seed):
    from fxprune.rules.norms import DenseCountLayerNorm, dense_count_layer_norm

    model, x = build(TinyConvNeXt, 8)
    cg = fxprune.analyze(fxprune.trace(model, (x,)))
    stream = next(g for g in cg.groups if g.size == 8)
    assert stream.prunable, stream.reason
    assert {"norm", "head_norm"} <= {s.node for s in stream.sites}  # each norm's output is gated too
    res = prune_and_check(model, x, seed=seed)
    fin, kept = res["fin"], res["fin"].stem.out_channels
    assert kept < 8 and isinstance(fin.norm, DenseCountLayerNorm) and fin.norm.dense_features == 8
    assert fin.norm.normalized_shape == (kept,) and fin.gamma.shape == (kept,)
    assert any(n.target is dense_count_layer_norm for n in fin.graph.nodes)  # the functional stem norm
    x2 = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        assert rel_diff(fin(x2), res["gated"](x2)) <= 10 * RTOL


def test_a_layer_norm_over_channels_that_are_not_zero_when_removed_blocks():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.norm, self.out = nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3)

        def forward(self, x):
            return self.out(self.norm(torch.sigmoid(self.fc(x))))

    cg = fxprune.analyze(fxprune.trace(Net(), (torch.randn(2, 6),)))
    group = next(g for g in cg.groups if g.size == 8)
    assert not group.prunable and "not known to be zero" in group.reason


def test_a_layer_norm_over_another_dim_leaves_the_gate_at_the_producer():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.norm, self.out = nn.Conv2d(3, 8, 3, padding=1), nn.LayerNorm(6), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.out(torch.relu(self.norm(self.conv(x))))

    model, x = build(Net, 6)
    res = prune_and_check(model, x, seed=1)
    assert res["fin"].norm.weight.shape == (6,)  # normalized over the width: not sliced
