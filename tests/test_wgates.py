"""W-Gates (METHODS.md §2): gates are a learned function of the filters, their straight-through
gradient, the budget met by the decision, and the block-internal scope."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxprune
from fxprune.analysis import bypassed_groups
from fxprune.cost import count_macs
from fxprune.errors import BudgetError, ConfigError
from fxprune.models import resnet20
from helpers import resumed_equals_uninterrupted, run_steps


def small_net() -> nn.Module:
    """Three 3x3 convs; the last two have filters of the same size (48 * 9), so they share a gate network."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU(),
                         nn.Conv2d(48, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU(),
                         nn.Conv2d(48, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 10)).eval()


X = (torch.randn(1, 3, 16, 16),)


def _batches(n: int, shape=(3, 16, 16)) -> list:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, *shape, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


def _optimizer(prepared) -> torch.optim.Optimizer:
    return torch.optim.SGD([{"params": prepared.model_parameters()},
                            {"params": prepared.method_parameters(), "lr": 0.2}], lr=0.05, momentum=0.9)


def _trained(budget: float = 0.5, steps: int = 6, total: int = 20, **options):
    prepared = fxprune.prepare(small_net(), "wgates", fxprune.Budget(flops=budget), X, total_steps=total,
                               **options)
    prepared.module.train()
    run_steps(prepared, _batches(steps), _optimizer(prepared))
    return prepared


def _gates_of(prepared) -> dict[str, object]:
    """Each conv's gate, by the conv's module name (each conv here produces one group alone)."""
    out = {}
    for gate in prepared.method.gates.values():
        (param, _, _), = gate.filters
        name = next(n for n, p in prepared.ctx.traced.named_parameters() if p is param)
        out[name.rsplit(".", 1)[0]] = gate
    return out


def _centre(prepared, gate) -> None:
    """Move the shared output bias so that about half of ``gate``'s units are open: the network
    then decides inside its range, not everything open as at the start. The units the path held
    open (``floor``, a schedule's state, not the gate function) are released."""
    for g in prepared.method.gates.values():
        g.floor.zero_()
    with torch.no_grad():
        s = gate.scores()
        for net in prepared.method.nets.values():
            net[-1].bias.sub_(float(s.median()) + 1e-4)


def test_identical_filters_get_identical_gates():
    """The gate is a function of the filter alone: copying conv 3's filters into conv 6 (same
    filter size, so the same trained network reads both) gives conv 6 exactly conv 3's gates."""
    prepared = _trained()
    gates = _gates_of(prepared)
    a, b = gates["3"], gates["6"]
    _centre(prepared, a)
    assert not torch.equal(a.scores(), b.scores())  # different filters, different scores
    with torch.no_grad():
        prepared.ctx.traced.get_submodule("6").weight.copy_(prepared.ctx.traced.get_submodule("3").weight)
    assert torch.equal(a.scores(), b.scores())
    assert torch.equal(a.values(), b.values())
    assert 0 < float(a.values().detach().mean()) < 1  # a real decision, not all open
    # no parameter of a gate's own: every trainable parameter is a shared network's
    nets = {id(p) for p in prepared.method.nets.parameters()}
    assert all(id(p) in nets for g in prepared.method.gates.values() for p in g.parameters())
    assert sum(p.numel() for p in prepared.method_parameters()) == \
        sum(p.numel() for net in prepared.method.nets.values() for p in net.parameters())


def test_a_layers_kept_fraction_moves_with_its_weights():
    """Scaling every filter of one layer (its level, which a per-layer normalisation would erase)
    or replacing its filters changes that layer's kept fraction and no other layer's."""
    prepared = _trained()
    gates = _gates_of(prepared)
    _centre(prepared, gates["3"])
    before = {k: g.values().detach().clone() for k, g in gates.items()}
    conv = prepared.ctx.traced.get_submodule("3")
    saved = conv.weight.detach().clone()
    fractions = []
    for change in (lambda w: w.mul_(4.0), lambda w: w.copy_(torch.randn_like(w) * saved.std())):
        with torch.no_grad():
            change(conv.weight)
        fractions.append(float(gates["3"].values().detach().mean()))
        assert all(torch.equal(gates[k].values().detach(), before[k]) for k in ("0", "6"))
        with torch.no_grad():
            conv.weight.copy_(saved)
    assert torch.equal(gates["3"].values().detach(), before["3"])  # the same weights, the same gates again
    base = float(before["3"].mean())
    assert all(abs(f - base) >= 4 / 48 for f in fractions), (base, fractions)


@pytest.mark.parametrize("surrogate", ["sigmoid", "identity"])
def test_straight_through_gradient_is_the_surrogates(surrogate):
    """Forward: exactly 0/1. Backward: d(sum a * g)/d(theta) of the gate network equals a central
    finite difference of the relaxed surrogate sum a * sigma(s / T) (or sum a * s / T)."""
    prepared = _trained(steps=4, surrogate=surrogate)
    gate = _gates_of(prepared)["3"]
    _centre(prepared, gate)
    prepared.method.nets.double().zero_grad()
    a = torch.randn(gate.size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    values = gate.values()
    assert set(values.detach().unique().tolist()) == {0.0, 1.0}
    (a * values).sum().backward()
    relax = (lambda s: torch.sigmoid(s / gate.temperature)) if surrogate == "sigmoid" else (lambda s: s / gate.temperature)
    net = prepared.method.nets[str(48 * 9)]
    checked = 0
    for param in (net[0].weight, net[0].bias, net[2].weight, net[2].bias):
        for i in torch.randperm(param.numel(), generator=torch.Generator().manual_seed(2))[:4].tolist():
            flat = param.data.view(-1)
            old, eps = float(flat[i]), 1e-6
            with torch.no_grad():
                flat[i] = old + eps
                up = float((a * relax(gate.scores())).sum())
                flat[i] = old - eps
                down = float((a * relax(gate.scores())).sum())
                flat[i] = old
            assert param.grad.view(-1)[i].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-9)
            checked += abs(param.grad.view(-1)[i].item()) > 0
    assert checked >= 4  # the gradient reaches the network, not only zeros compared


def test_decision_meets_the_budget_and_finalize_counts_it():
    """After real training the decision meets the budget, uses most of it, and the finalized module
    has exactly the MACs the decision was counted at."""
    prepared = _trained(budget=0.4, steps=20)
    decided = prepared.method.decide(prepared.ctx).keep
    macs = prepared.ctx.cost.macs(decided)
    assert 0.9 * prepared.targets.macs < macs <= prepared.targets.macs
    pruned = fxprune.finalize(prepared)
    assert count_macs(pruned, X) == prepared.measured["macs"] <= prepared.targets.macs
    report = prepared.method.report(prepared.ctx)
    assert report["searched"] > 0 and set(report["kept_by_gates"]) == set(prepared.method.gates)


def test_the_cut_never_runs_ahead_of_the_path_and_decide_fills_the_budget():
    """Gates that all want to close (every score negative): training holds the best ones open at
    T(t), and decide lands just under the budget, not at one unit per group."""
    prepared = fxprune.prepare(small_net(), "wgates", fxprune.Budget(flops=0.4), X, total_steps=10)
    method, ctx = prepared.method, prepared.ctx
    with torch.no_grad():
        for net in method.nets.values():
            net[-1].bias.fill_(-100.0)
    ctx.step = 4  # past warm-up, on the path: T(t) between dense and the budget
    method.after_step(ctx)
    keep = method.binary()
    allowed, macs = method.allowed(ctx), ctx.cost.macs(keep)
    assert prepared.targets.macs < allowed < prepared.targets.dense_macs
    assert allowed * 0.9 < macs <= allowed
    decided = method.decide(ctx).keep
    assert 0.9 * prepared.targets.macs < ctx.cost.macs(decided) <= prepared.targets.macs
    assert count_macs(fxprune.finalize(prepared), X) <= prepared.targets.macs


def test_resumes_mid_training():
    def setup():
        prepared = fxprune.prepare(small_net(), "wgates", fxprune.Budget(flops=0.5), X, total_steps=12)
        prepared.module.train()
        return prepared, _optimizer(prepared)

    resumed_equals_uninterrupted(setup, _batches(12), cut=5)


def test_internal_scope_prunes_only_block_internal_groups():
    """ResNet-20 with scope='internal': only the groups a residual path bypasses get gates and
    lose units; the residual streams keep every channel, and the budget still holds."""
    torch.manual_seed(0)
    model, x = resnet20(), (torch.randn(1, 3, 8, 8),)
    prepared = fxprune.prepare(model, "wgates", fxprune.Budget(flops=0.5), x, total_steps=8,
                               scope="internal")
    internal = bypassed_groups(prepared.ctx.traced, prepared.ctx.graph)
    assert set(prepared.method.gates) == internal and len(internal) == 9
    prepared.module.train()
    run_steps(prepared, _batches(8, (3, 8, 8)), _optimizer(prepared))
    keep = prepared.method.decide(prepared.ctx).keep
    assert all(not keep[g].all() for g in internal)  # the cut falls on the internal groups ...
    streams = [g.id for g in prepared.ctx.graph.prunable_groups if g.id not in internal]
    assert streams and all(g not in keep or keep[g].all() for g in streams)  # ... and only there
    pruned = fxprune.finalize(prepared)
    assert [pruned.get_submodule(n).out_channels for n in ("conv1", "layer1.2.conv2", "layer3.2.conv2")] == [16, 16, 64]
    assert count_macs(pruned, x) <= prepared.targets.macs


def test_internal_scope_refuses_what_it_cannot_do():
    with pytest.raises(ConfigError, match="block-internal"):
        fxprune.prepare(small_net(), "wgates", fxprune.Budget(flops=0.5), X, total_steps=4,
                        scope="internal")
    with pytest.raises(BudgetError, match="block-internal"):
        fxprune.prepare(resnet20(), "wgates", fxprune.Budget(flops=0.05), (torch.randn(1, 3, 8, 8),), total_steps=4,
                        scope="internal")
    with pytest.raises(ConfigError, match="scope"):
        fxprune.prepare(small_net(), "wgates", fxprune.Budget(flops=0.5), X, total_steps=4,
                        scope="inner")
