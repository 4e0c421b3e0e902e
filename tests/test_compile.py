"""Cost model, budgets, the l1 and gdp methods, prepare/finalize/resume and compile."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import fxprune
from fxprune.budget import allocate
from fxprune.passes.gates import apply_decision, read_gates
from fxprune.cost import CostModel
from fxprune.data import digits_loaders
from fxprune.models import build_model
from helpers import resumed_equals_uninterrupted
from fxprune.passes import finalize, insert_gates


def _flop_counter(model, x) -> int:
    with FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops()


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "regnet_y_400mf", "densenet121"])
def test_cost_model_agrees_with_flop_counter_dense_and_pruned(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    gm = fxprune.trace(model, (x,))
    cg = fxprune.analyze(gm)
    cost = CostModel(gm, cg)
    assert 2 * 2 * cost.macs() == _flop_counter(model, x)  # 2 FLOPs per MAC, batch of 2
    assert cost.params() == sum(p.numel() for p in model.parameters())
    rng = np.random.default_rng(0)
    keep = allocate(cost, fxprune.Budget(flops=0.5).resolve(cost), {g.id: rng.random(g.size) for g in cg.prunable_groups})
    gated, gates = insert_gates(gm, cg)
    with torch.no_grad():
        for gid, gate in gates.items():
            gate.weight.copy_(torch.as_tensor(keep[gid], dtype=torch.float32))
    pruned = finalize(gated, cg)
    assert 4 * cost.macs(keep) == _flop_counter(pruned, x)
    assert cost.params(keep) == sum(p.numel() for p in pruned.parameters())
    assert cost.macs(keep) <= 0.5 * cost.macs()


@pytest.mark.parametrize("round_to", [1, 8])
def test_allocate_feeds_every_layer_of_shufflenet_so_finalize_keeps_no_uncounted_channel(round_to):
    """shufflenet_v2's branches read half of a shuffled group: a global ranking could empty one
    branch conv's input while every group keeps units, and finalize then kept a zero channel the
    budget had not counted (l1 at 40% FLOPs missed by 0.5%)."""
    torch.manual_seed(0)
    model = torchvision.models.shufflenet_v2_x1_0(weights=None, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    r = fxprune.compile(model, "l1", fxprune.Budget(flops=0.4, round_to=round_to), (x,), progress=False)
    assert r.report.pruned["flops"] <= r.report.target["flops"]
    assert not any("no channels left" in why for why in r.report.retained.values())
    gm = fxprune.trace(model, (x,))
    cost = CostModel(gm, fxprune.analyze(gm))
    rng = np.random.default_rng(1)
    for _ in range(3):
        scores = {g.id: rng.random(g.size) for g in cost.cg.prunable_groups}
        keep = allocate(cost, fxprune.Budget(flops=0.4, round_to=round_to).resolve(cost), scores)
        assert not cost.starved(keep)
        assert all(k.sum() == len(k) or k.sum() % round_to == 0 for k in keep.values())


def test_soft_cost_is_differentiable_and_matches_hard_at_binary_values():
    model = build_model("resnet20").eval()
    gm = fxprune.trace(model, (torch.randn(1, 3, 32, 32),))
    cg = fxprune.analyze(gm)
    cost = CostModel(gm, cg)
    soft = {g.id: torch.ones(g.size, requires_grad=True) for g in cg.prunable_groups}
    macs = cost.macs(soft)
    macs.backward()
    assert macs.item() == cost.macs()
    assert all(t.grad is not None and bool((t.grad > 0).all()) for t in soft.values())


def test_budget_below_floor_raises_budget_error_with_floor():
    model = build_model("resnet20").eval()
    with pytest.raises(fxprune.BudgetError, match="floor"):
        fxprune.prepare(model, "l1", fxprune.Budget(flops=0.001), (torch.randn(1, 3, 32, 32),))
    with pytest.raises(fxprune.ConfigError):
        fxprune.Budget()
    with pytest.raises(fxprune.ConfigError):
        fxprune.compile(model, "nope", fxprune.Budget(flops=0.5), (torch.randn(1, 3, 32, 32),))


@pytest.mark.parametrize("budget", [fxprune.Budget(flops=0.5), fxprune.Budget(params=0.4, round_to=4),
                                    fxprune.Budget(flops=0.25, params=0.5)])
def test_l1_meets_budget_exactly_after_finalize(budget):
    torch.manual_seed(0)
    model = build_model("resnet56").eval()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(1, 3, 32, 32)
    result = fxprune.compile(model, "l1", budget, (x,), progress=False)
    report = result.report
    if budget.flops is not None:
        assert report.pruned["flops"] <= budget.flops * report.dense["flops"]
        assert report.pruned["flops"] > 0.8 * budget.flops * report.dense["flops"]  # not wastefully below
    if budget.params is not None:
        assert report.pruned["params"] <= budget.params * report.dense["params"]
    for g in report.groups:
        if g["kept"] < g["size"]:
            assert g["kept"] >= 1 and g["kept"] % (budget.round_to or 1) == 0
    assert result.prepared.targets.round_to == (budget.round_to or 1)  # no backend named: no channel multiple
    assert report.equivalence["max_rel_diff"] < 1e-4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert result.model(x).shape == (1, 10)


def test_l1_keeps_the_largest_filters():
    model = build_model("vgg11_bn").eval()
    prepared = fxprune.prepare(model, "l1", fxprune.Budget(flops=0.5), (torch.randn(1, 3, 32, 32),))
    keep = prepared.method.decide(prepared.ctx).keep
    assert not any("fxprune_gates" in n for n, _ in prepared.module.named_modules())  # l1 inserts no gates

    for g in prepared.channel_graph.prunable_groups:
        scores = fxprune.scores.l1(prepared.module, prepared.channel_graph, g)
        if 0 < keep[g.id].sum() < g.size:
            assert scores[keep[g.id]].min() >= scores[~keep[g.id]].max()


def _batches(n: int, seed: int = 0):
    data = digits_loaders(image_size=16, batch_size=32, seed=seed)
    it = iter(data.train)
    return [next(it) for _ in range(n)], data


def _gdp_setup():
    torch.manual_seed(0)
    model = build_model("resnet20")
    prepared = fxprune.prepare(model, "gdp", fxprune.Budget(flops=0.5), (torch.randn(2, 3, 16, 16),),
                               total_steps=12, lam_rate=0.5)
    opt = torch.optim.SGD([{"params": prepared.model_parameters()},
                           {"params": prepared.method_parameters(), "lr": 0.2, "weight_decay": 0.0}], lr=0.05, momentum=0.9)
    return prepared, opt


def test_gdp_prepare_resume_equals_uninterrupted_and_folds_exactly():
    batches, _ = _batches(12)
    a, c = resumed_equals_uninterrupted(_gdp_setup, batches, 6)
    assert a.method.lam == c.method.lam
    # the FLOPs penalty pushed some gates to exact zeros, and lam grew while above budget
    assert a.method.lam != 1.0
    pruned = fxprune.finalize(a)
    rep = a.finalize_report
    assert rep.max_rel_diff < 1e-4  # fold is exact: no fine-tuning needed for equivalence
    assert fxprune.count_macs(pruned, (torch.randn(1, 3, 16, 16),)) <= a.targets.macs
    # The pruned module computes what the decision means, on data it was not checked on; where the
    # decision is what the gates hold (no fallback), that is the trained gated module itself.
    reference = apply_decision(a.module, a.channel_graph, a.decision).eval()
    pruned.eval()
    x = batches[0][0]
    with torch.no_grad():
        ref, out = reference(x), pruned(x)
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-4
    gates_say = read_gates(a.module, a.channel_graph)
    if all((gates_say.keep[g] == a.decision.keep[g]).all() for g in a.method.gates):
        with torch.no_grad():
            assert torch.allclose(a.module.eval()(x), out, rtol=1e-4, atol=1e-5)


def test_gdp_gate_function_and_polarization():
    from fxprune.passes.methods.gdp import GDPGate

    gate = GDPGate(4, 0, eps=0.01, init=1.0)
    with torch.no_grad():
        gate.weight.copy_(torch.tensor([0.0, 0.05, 0.1, 1.0]))
    v = gate.values()
    assert v[0] == 0 and 0 < v[1] < v[2] < v[3] < 1
    v.sum().backward()
    assert gate.weight.grad[0] == 0  # zero is an attractor: no gradient leaves it


def test_gdp_reports_polarization_of_its_gates():
    prepared = _gdp_after_warmup(fxprune.Budget(flops=0.5))
    m = prepared.method
    with torch.no_grad():
        for gate in m.gates.values():
            gate.weight.fill_(10.0)  # g = 100 / (100 + eps) ~ 1: polarized
            gate.weight[:2] = 0.0  # exact zeros
            gate.weight[2] = float(np.sqrt(gate.eps.item()))  # g = 0.5: undecided
    n = sum(g.weight.numel() for g in m.gates.values())
    pol = m.report(prepared.ctx)
    assert pol["zero_fraction"] == pytest.approx(2 * len(m.gates) / n)
    assert pol["undecided_fraction"] == pytest.approx(len(m.gates) / n)
    assert pol["polarized_fraction"] == pytest.approx(1 - 3 * len(m.gates) / n)
    assert pol["met_at"] is None and pol["met_at_fraction"] is None


def _gdp_after_warmup(budget, step=80):
    torch.manual_seed(0)
    prepared = fxprune.prepare(build_model("resnet20"), "gdp", budget, (torch.randn(2, 3, 16, 16),), total_steps=100)
    prepared.ctx.step = step  # 80: past the warm-up (25) and the search (to 75), where the path is the budget
    return prepared


def _gates_below_snap(m):
    """Every gate but one per group far below ``snap`` relative to its group's largest, in a random order."""
    with torch.no_grad():
        for gate in m.gates.values():
            gate.weight.copy_(0.02 * torch.rand(gate.weight.shape))
            gate.weight[0] = 1.0


def _unit_costs(prepared, m):
    full = {gid: np.ones(g.weight.numel(), dtype=bool) for gid, g in m.gates.items()}
    dense = float(prepared.cost.macs(full))
    largest_unit = max(dense - float(prepared.cost.macs({**full, gid: np.arange(len(mask)) != 0}))
                       for gid, mask in full.items())  # one unit's cost is largest in the dense model
    return dense, largest_unit


def test_gdp_snaps_only_as_many_gates_as_the_budget_needs():
    prepared = _gdp_after_warmup(fxprune.Budget(flops=0.5))
    m = prepared.method
    _gates_below_snap(m)
    prepared.step()
    macs, target = int(prepared.cost.macs(m.hard_keep())), prepared.targets.macs
    _, largest_unit = _unit_costs(prepared, m)
    assert target - largest_unit <= macs <= target
    assert m.met_at == prepared.ctx.step and m.gates[0].eps.item() == pytest.approx(m.options.eps_start)


def test_gdp_follows_its_path_during_the_search():
    """Halfway through the search the hard cost may fall only halfway to the budget, however
    many gates are below ``snap``: pruning is gradual, so the network can adapt."""
    prepared = _gdp_after_warmup(fxprune.Budget(flops=0.5), step=49)  # step() counts it: 50 of 100
    m = prepared.method
    _gates_below_snap(m)
    lam = m.lam
    prepared.step()
    dense, largest_unit = _unit_costs(prepared, m)
    path = m.path(prepared.ctx).macs
    assert path == pytest.approx(dense - 0.5 * (dense - prepared.targets.macs), rel=1e-6)
    assert path - largest_unit <= prepared.cost.macs(m.hard_keep()) <= path
    assert m.met_at is None and m.lam < lam  # on the path: the penalty eases off


def test_gdp_decide_rounds_widths_and_needs_total_steps():
    prepared = _gdp_after_warmup(fxprune.Budget(flops=0.9, round_to=4))
    m = prepared.method
    with torch.no_grad():
        for gate in m.gates.values():
            gate.weight[: 3] = 0.0  # 3 units removed from every group: widths 13, 29, 61
    decision = m.decide(prepared.ctx)
    assert all(mask.sum() % 4 == 0 for mask in decision.keep.values())
    assert all(int((g.values() > 0).sum()) - 1 == decision.keep[gid].sum() for gid, g in m.gates.items())
    assert all(torch.equal(decision.scale[gid], g.values().detach()) for gid, g in m.gates.items())
    with pytest.raises(fxprune.ConfigError, match="total_steps"):
        fxprune.prepare(build_model("resnet20"), "gdp", fxprune.Budget(flops=0.5), (torch.randn(1, 3, 16, 16),))


def test_compile_gdp_on_digits_meets_budget_and_reports():
    torch.manual_seed(0)
    data = digits_loaders(image_size=16, batch_size=64)
    model = build_model("resnet20")
    result = fxprune.compile(model, "gdp", fxprune.Budget(flops=0.5), data.example_inputs(), train_loader=data.train,
                             eval_loader=data.test, epochs=2, finetune_epochs=1, progress=False)
    r = result.report
    assert r.pruned["flops"] <= 0.5 * r.dense["flops"]
    assert r.pruned["params"] < r.dense["params"]
    assert r.equivalence["max_rel_diff"] < 1e-4
    assert r.accuracy["pruned"] is not None and r.accuracy["finetuned"] is not None
    assert [e["phase"] for e in r.epochs] == ["train", "train", "finetune"]
    # The gates themselves reached the budget (no fallback ranking) and did not overshoot it.
    assert result.prepared.method.met_at is not None and r.pruned["flops"] >= 0.4 * r.dense["flops"]
    assert r.accuracy["gated"] == r.accuracy["pruned"]
    pol = r.method_report
    assert pol["met_at"] == result.prepared.method.met_at and 0 < pol["met_at_fraction"] <= 1
    assert pol["zero_fraction"] + pol["polarized_fraction"] + pol["undecided_fraction"] <= 1 + 1e-12
    assert pol["zero_fraction"] == pytest.approx(1 - sum(g["kept"] for g in r.groups if g["id"] in result.prepared.method.gates)
                                                 / sum(g["size"] for g in r.groups if g["id"] in result.prepared.method.gates))
    assert "MACs" in r.summary() and r.to_json().startswith("{")
    with pytest.raises(fxprune.ConfigError, match="train_loader"):
        fxprune.compile(model, "gdp", fxprune.Budget(flops=0.5), data.example_inputs())


def test_cli_compile_writes_model_and_report(tmp_path):
    from fxprune.flow.cli import main

    rc = main(["compile", "--model", "resnet20", "--method", "l1", "--flops", "0.5", "--epochs", "0",
               "--finetune-epochs", "0", "--image-size", "16", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    import json

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["pruned"]["flops"] <= 0.5 * report["dense"]["flops"]
    model = torch.load(tmp_path / "model.pt", weights_only=False)
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 10)
    assert main(["compile", "--method", "l1", "--flops", "0.0001", "--epochs", "0", "--finetune-epochs", "0",
                 "--image-size", "16", "--out", str(tmp_path), "--no-progress"]) == 2
