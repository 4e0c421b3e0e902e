"""Functionality-oriented pruning (issue 28): activation maximisation with the blur, clustering, the merge of
removed filters into their representative, equal widths for two methods, and the vgg8 reference model."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import fxprune
import fxprune.data
import fxprune.passes
import fxprune.train
from fxprune import scores
from fxprune.decision import Decision, Merge, merge_consumers
from fxprune.errors import ConfigError
from fxprune.models import build_model
from fxprune.passes.methods.functionality import _gaussian


def scaled_copies_net() -> nn.Module:
    """conv(3 -> 8), ReLU, conv(8 -> 5): filters 4..7 are filters 0..3 times 0.5, 1, 2, 3 (with their
    biases), so after the ReLU channel 4 + i is exactly that multiple of channel i."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))
    factors = torch.tensor([0.5, 1.0, 2.0, 3.0])
    with torch.no_grad():
        net[0].weight[4:] = net[0].weight[:4] * factors.view(4, 1, 1, 1)
        net[0].bias[4:] = net[0].bias[:4] * factors
    return net.eval()


def loader(n: int = 64, seed: int = 1, shape=(3, 8, 8)) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, *shape, generator=g), torch.randint(0, 3, (n,), generator=g)),
                      batch_size=16)


X = (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)),)


def first_group(cg) -> int:
    return next(g.id for g in cg.prunable_groups if g.size == 8)


def test_blur_is_the_normalised_3x3_gaussian_of_sigma_one_half():
    k = _gaussian(0.5, 2)
    assert k.shape == (2, 1, 3, 3)
    edge, corner = math.exp(-1 / (2 * 0.25)), math.exp(-2 / (2 * 0.25))
    total = 1 + 4 * edge + 4 * corner
    assert k[0, 0, 1, 1].item() == pytest.approx(1 / total)  # 0.619...
    assert k[1, 0, 0, 1].item() == pytest.approx(edge / total)
    assert k[0, 0, 0, 0].item() == pytest.approx(corner / total)
    assert torch.equal(_gaussian(0.0, 1)[0, 0], torch.tensor([[0.0, 0, 0], [0, 1, 0], [0, 0, 0]]))


def test_ascent_raises_each_units_activation_and_scaled_copies_share_a_pattern():
    net = scaled_copies_net()
    prepared = fxprune.prepare(net, "functionality", fxprune.Budget(flops=0.99), X, progress=False, ascent_steps=30)
    method, cg = prepared.method, prepared.channel_graph
    group = next(g for g in cg.prunable_groups if g.size == 8)
    patterns, strength = method._ascent(prepared.ctx, [group])[group.id]
    with torch.no_grad():  # the unit's feature map is the conv's output (no norm: where a gate would sit)
        acts = net[0](torch.from_numpy(patterns).float().view(8, 3, 8, 8)).sum((2, 3)).diagonal()
        start = net[0](torch.zeros(1, 3, 8, 8)).sum((2, 3))[0]
    assert (acts > start + 1e-3).all()  # every unit's feature map grew from the constant start
    np.testing.assert_allclose(acts.detach().numpy(), strength, rtol=1e-4)
    # what a filter detects, not how strongly: a filter times c climbs c times faster along the same direction
    corr = np.corrcoef(patterns)
    assert all(corr[i, i + 4] > 0.95 for i in range(4)), corr
    assert method.cost["ascent_steps"] == 30


def test_merge_reproduces_the_dense_network_when_removed_filters_are_scaled_copies():
    """With the least-squares factor of the consumer inputs, merging 4 + i into i is exact (ReLU(c a) = c
    ReLU(a)); dropping them is not."""
    net = scaled_copies_net()
    dense = fxprune.count_macs(net, X)
    budget = fxprune.Budget(flops=(dense - 4 * 8 * 8 * (3 * 9 + 5 * 9)) / dense)
    fresh = torch.randn(16, 3, 8, 8)
    for representation in ("ascent", "sample"):
        prepared = fxprune.prepare(net, "functionality", budget, X, progress=False, representation=representation,
                                   ascent_steps=30)
        decision = prepared.method.decide(prepared.ctx, loader())
        gid = first_group(prepared.channel_graph)
        keep, merge = decision.keep[gid], decision.merge[gid]
        assert keep.sum() == 4 and all(keep[i] != keep[i + 4] for i in range(4))
        for i in range(4):  # each removed unit goes into its copy, with the ratio of the two activations
            u, r = (i + 4, i) if keep[i] else (i, i + 4)
            ratio = (0.5, 1.0, 2.0, 3.0)[i]
            assert merge.into[u] == r and merge.scale[u] == pytest.approx(ratio if u > r else 1 / ratio, rel=1e-6)
        merged = fxprune.passes.finalize(prepared.module, prepared.channel_graph, decision)
        dropped = fxprune.passes.finalize(prepared.module, prepared.channel_graph, Decision(decision.keep))
        with torch.no_grad():
            torch.testing.assert_close(merged(fresh), net(fresh), rtol=1e-4, atol=1e-5)
            assert (dropped(fresh) - net(fresh)).abs().max() > 1e-2
        assert merged.get_submodule("2").in_channels == 4


def test_merge_brings_a_trained_net_closer_to_dense_than_dropping():
    """A small conv net trained on digits (not planted copies): at 50% FLOPs the merged pruned model's logits
    are nearer the dense ones than those of the same keep set without the merge."""
    data = fxprune.data.digits_loaders(image_size=8, channels=1, batch_size=64, seed=0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    fxprune.train.train(net, data.train, 3, lr=0.05, progress=False)
    net.eval()
    x = data.example_inputs(4)
    prepared = fxprune.prepare(net, "functionality", fxprune.Budget(flops=0.5), x, progress=False,
                               representation="sample")
    decision = prepared.method.decide(prepared.ctx, data.train)
    assert decision.merge
    cg = prepared.channel_graph
    merged = fxprune.passes.finalize(prepared.module, cg, decision)
    dropped = fxprune.passes.finalize(prepared.module, cg, Decision(decision.keep))
    test = torch.cat([b for b, _ in data.test])
    with torch.no_grad():
        ref = net(test)
        err = lambda m: float((m(test) - ref).pow(2).mean())  # noqa: E731
        assert err(merged) < 0.8 * err(dropped), (err(merged), err(dropped))


def test_finalize_stays_exact_under_random_merges_and_kept_scales():
    """Random keep sets, merges and kept-unit scales on a BN net with a linear after a flatten: finalize's
    check passes (it compares with the gated model with the same merge), and the user's model is untouched."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1),
                        nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(4), nn.Flatten(), nn.Linear(24, 3)).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    gm = fxprune.trace(net, X)
    cg = fxprune.analyze(gm)
    rng = np.random.default_rng(0)
    for _ in range(3):
        keep, merge, scale = {}, {}, {}
        for g in cg.prunable_groups:
            mask = rng.random(g.size) < 0.5
            mask[rng.integers(g.size)] = True
            kept = np.nonzero(mask)[0]
            into = np.where(mask, -1, rng.choice(kept, g.size))
            keep[g.id], merge[g.id] = mask, Merge(into, rng.normal(size=g.size))
            scale[g.id] = torch.from_numpy(rng.uniform(0.2, 2.0, g.size)).float()
        decision = Decision(keep, scale=scale, merge=merge)
        report = fxprune.passes.FinalizeReport()
        pruned = fxprune.passes.finalize(gm, cg, decision, report=report)
        assert report.max_rel_diff < 1e-4
        reference = fxprune.passes.apply_decision(gm, cg, decision.complete(cg))
        assert merge_consumers(reference, cg, decision) == 2  # the second conv and the linear
        with torch.no_grad():
            torch.testing.assert_close(pruned(X[0]), reference(X[0]), rtol=1e-4, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_merge_must_map_removed_units_onto_kept_ones():
    gm = fxprune.trace(scaled_copies_net(), X)
    cg = fxprune.analyze(gm)
    gid = first_group(cg)
    keep = np.arange(8) < 4
    with pytest.raises(ConfigError, match="merge of group"):
        Decision({gid: keep}, merge={gid: Merge(np.array([-1, -1, -1, -1, 5, -1, -1, -1]), np.ones(8))}).complete(cg)


def test_widths_and_top_k_give_two_methods_the_same_per_group_widths():
    net = scaled_copies_net()
    prepared = fxprune.prepare(net, "l1", fxprune.Budget(flops=0.6), X, progress=False)
    cg = prepared.channel_graph
    l1 = prepared.method.decide(prepared.ctx)
    widths = l1.kept()
    func = fxprune.prepare(net, "functionality", fxprune.Budget(flops=0.6), X, progress=False,
                           representation="sample", widths=widths)
    decision = func.method.decide(func.ctx, loader())
    assert decision.kept() == widths
    again = Decision.top_k(scores.group_scores("l1", prepared.module, cg), widths)
    assert again.kept() == widths and all(np.array_equal(again.keep[g], l1.keep[g]) for g in widths)
    bad = fxprune.prepare(net, "functionality", fxprune.Budget(flops=0.6), X, progress=False,
                          representation="sample", widths={first_group(cg): 0})
    with pytest.raises(ConfigError, match="widths"):
        bad.method.decide(bad.ctx, loader())


def test_decide_is_repeatable_and_leaves_the_model_alone():
    net = scaled_copies_net()
    prepared = fxprune.prepare(net, "functionality", fxprune.Budget(flops=0.7), X, progress=False, ascent_steps=5)
    before = {k: v.clone() for k, v in prepared.module.state_dict().items()}
    a = prepared.method.decide(prepared.ctx, loader())
    b = prepared.method.decide(prepared.ctx, loader())
    assert all(np.array_equal(a.keep[g], b.keep[g]) for g in a.keep)
    assert all(np.array_equal(a.merge[g].scale, b.merge[g].scale) for g in a.merge)
    assert all(torch.equal(before[k], v) for k, v in prepared.module.state_dict().items())
    assert all(p.requires_grad for p in prepared.module.parameters())


def test_vgg8_is_a_small_plain_vgg_for_any_input_from_16_pixels():
    torch.manual_seed(0)
    model = build_model("vgg8", in_channels=1).eval()
    assert 0.2e6 <= sum(p.numel() for p in model.parameters()) <= 0.5e6
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 6 and sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 3
    for side in (16, 32):
        x = torch.randn(2, 1, side, side)
        with torch.no_grad():
            assert torch.equal(torch.fx.symbolic_trace(model)(x), model(x))
            assert model(x).shape == (2, 10)
    cg = fxprune.analyze(fxprune.trace(model, (torch.randn(1, 1, 16, 16),)))
    assert len(cg.prunable_groups) == 7  # six conv widths and the hidden linear
