"""DSA (issue 10): keep probabilities solved per group, straight-through and implicit gradients,
the quadratic budget from the cost model, the ADMM outer update, exact budgets in both modes."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import fxprune
from fxprune.data import digits_loaders
from fxprune.errors import ConfigError
from fxprune.models import build_model
from fxprune.passes.gates import gate_sites
from fxprune.passes.methods.dsa import keep_probabilities
from fxprune.train import train


@pytest.fixture(scope="module")
def data():
    return digits_loaders(image_size=16, batch_size=32, seed=0)


def _prepared(data, steps: int = 40, budget: float = 0.5, model: nn.Module | None = None, **options):
    torch.manual_seed(0)
    model = model if model is not None else build_model("resnet20", num_classes=10)
    return fxprune.prepare(model, "dsa", fxprune.Budget(flops=budget), data.example_inputs(), total_steps=steps,
                           progress=False, **options)


def _padded(sizes: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    log_b = torch.zeros(len(sizes), max(sizes), dtype=torch.float64)
    valid = torch.zeros(len(sizes), max(sizes), dtype=torch.bool)
    for k, n in enumerate(sizes):
        log_b[k, :n] = torch.as_tensor(np.log(rng.gamma(2.0, 0.5, n)))
        valid[k, :n] = True
    return log_b, valid


def test_bisection_makes_the_mean_keep_probability_the_keep_ratio():
    sizes = [3, 16, 64, 7, 128]
    log_b, valid = _padded(sizes)
    for alpha in (0.02, 0.1, 0.5, 0.9, 0.993):
        for beta2 in (0.5, 1.0, 4.0):
            a = torch.full((len(sizes),), alpha, dtype=torch.float64)
            p = keep_probabilities(log_b, valid, a, beta2)
            means = p.sum(1) / valid.sum(1)
            assert torch.allclose(means, a, atol=1e-3), (alpha, beta2, means)
            assert float(p[valid].min()) >= 0.01 and float(p.max()) <= 1.0 and float(p[~valid].abs().max()) == 0


def test_implicit_gradient_matches_finite_differences():
    sizes = [5, 16, 9]
    log_b, valid = _padded(sizes, seed=1)
    weights = torch.randn(len(sizes), max(sizes), dtype=torch.float64)
    for value in (0.2, 0.6, 0.95):
        alpha = torch.full((len(sizes),), value, dtype=torch.float64, requires_grad=True)
        (keep_probabilities(log_b, valid, alpha, 1.0) * weights).sum().backward()
        eps = 1e-5
        for k in range(len(sizes)):
            up, down = alpha.detach().clone(), alpha.detach().clone()
            up[k] += eps
            down[k] -= eps
            fd = ((keep_probabilities(log_b, valid, up, 1.0) - keep_probabilities(log_b, valid, down, 1.0)) * weights
                  ).sum() / (2 * eps)
            assert float(alpha.grad[k]) == pytest.approx(float(fd), rel=1e-4, abs=1e-7), (value, k)


def test_straight_through_and_implicit_gradient_to_a_match_finite_differences_on_a_tiny_model():
    torch.manual_seed(0)
    # smooth activations: after a ReLU a dropped unit's mask (0) sits on the kink, where autograd's
    # one-sided 0 and a central difference disagree by construction
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Tanh(), nn.Conv2d(6, 5, 3, padding=1),
                        nn.BatchNorm2d(5), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.2, 2.0)  # distinct importances
    x, y = torch.randn(8, 3, 6, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    net = net.double()
    prepared = fxprune.prepare(net, "dsa", fxprune.Budget(flops=0.5), (x,), total_steps=10, progress=False, init=0.5)
    method, module = prepared.method, prepared.module
    module.train()
    torch.nn.functional.cross_entropy(module(x), y).backward()
    grads = {gid: float(method.logits.grad[k]) for k, gid in enumerate(method.order)}
    masks = {gid: method.gates[gid].current.detach().double().clone() for gid in method.order}
    method.sample = lambda *args: None  # hold the drawn masks while differencing

    def loss_at(gid: int, unit: int, delta: float) -> float:
        for g in method.order:
            method.gates[g].current = masks[g].clone()
        method.gates[gid].current[unit] += delta
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(module(x), y))

    eps = 1e-5
    dl_dm = {gid: np.array([(loss_at(gid, i, eps) - loss_at(gid, i, -eps)) / (2 * eps) for i in range(len(masks[gid]))])
             for gid in method.order}
    probs_at = {}  # dp/da by finite differences of the solved probabilities (row k depends on a_k alone)
    for sign in (1, -1):
        with torch.no_grad():
            method.logits += sign * eps
            probs_at[sign] = method.probabilities().detach().numpy()
            method.logits -= sign * eps
    for k, gid in enumerate(method.order):
        n = len(masks[gid])
        dp_da = (probs_at[1][k, :n] - probs_at[-1][k, :n]) / (2 * eps)
        expected = float(dl_dm[gid] @ dp_da)
        assert grads[gid] == pytest.approx(expected, rel=1e-3, abs=1e-8), gid


def test_one_mask_per_group_shared_by_its_producers(data):
    prepared = _prepared(data)
    targets = {}
    for node in gate_sites(prepared.module):
        targets.setdefault(prepared.module.get_submodule(node.target).group_id, set()).add(node.target)
    assert all(len(t) == 1 for t in targets.values())
    streams = [g for g in prepared.channel_graph.prunable_groups if len(g.sites) > 1]
    assert streams and all(g.id in targets for g in streams)
    prepared.module.train()
    prepared.module(data.example_inputs()[0])
    for gid, gate in prepared.method.gates.items():  # a binary sample, one value per unit
        assert set(gate.current.detach().unique().tolist()) <= {0.0, 1.0} and len(gate.current) == gate.units


def test_quadratic_budget_is_the_cost_model(data):
    prepared = _prepared(data)
    cost, groups = prepared.cost, prepared.channel_graph.prunable_groups
    rng = np.random.default_rng(0)
    for name in ("macs", "params"):
        a, b, c = cost.quadratic(name, [g.id for g in groups])
        for _ in range(3):
            x = rng.random(len(groups))
            soft = {g.id: torch.full((g.size,), float(x[k]), dtype=torch.float64) for k, g in enumerate(groups)}
            assert float(x @ a @ x + b @ x + c) == pytest.approx(float(cost.resource(name)(soft)), rel=1e-9)
        ones = np.ones(len(groups))
        assert float(ones @ a @ ones + b @ ones + c) == pytest.approx(prepared.targets.dense[name], rel=1e-9)


def test_the_outer_update_brings_the_keep_ratios_onto_the_budget(data):
    prepared = _prepared(data, steps=120, budget=0.4)
    opt = torch.optim.SGD(prepared.model_parameters(), lr=0.05, momentum=0.9)
    method = prepared.method
    start = float(method.flops(method.alphas().detach()))
    n = 0
    while n < 120:
        for x, y in data.train:
            if n == 120:
                break
            opt.zero_grad()
            torch.nn.functional.cross_entropy(prepared.module(x), y).backward()
            opt.step()
            prepared.step(opt)
            n += 1
    end = float(method.flops(method.alphas().detach()))
    assert start > 2.0 and end < 1.1  # F(alpha) in units of the budget: from the dense model onto the budget
    assert float(method.flops(method.z)) <= 1 + 1e-6  # the auxiliary variable is always feasible
    assert method.rho > method.options.rho


def test_resume_mid_search_equals_an_uninterrupted_run(data):
    batches = []
    while len(batches) < 10:
        batches += list(data.train)
    batches = batches[:10]

    def run(prepared, opt, part):
        for x, y in part:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(prepared.module(x), y).backward()
            opt.step()
            prepared.step(opt)

    def new():
        p = _prepared(data, steps=10)
        return p, torch.optim.SGD(p.model_parameters(), lr=0.05, momentum=0.9)

    a, opt_a = new()
    run(a, opt_a, batches)
    b, opt_b = new()
    run(b, opt_b, batches[:4])
    state, opt_state = copy.deepcopy(b.state_dict()), copy.deepcopy(opt_b.state_dict())
    c, opt_c = new()
    c.load_state_dict(state)
    opt_c.load_state_dict(opt_state)
    run(c, opt_c, batches[4:])
    for (k, va), vc in zip(a.module.state_dict().items(), c.module.state_dict().values()):
        assert torch.equal(va, vc), k
    assert torch.equal(a.method.u, c.method.u) and a.method.rho == c.method.rho and c.ctx.step == 10


@pytest.mark.parametrize("trained", [False, True], ids=["from_scratch", "from_trained"])
def test_budget_met_exactly_from_scratch_and_from_a_trained_model(data, trained):
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10)
    if trained:
        train(model, data.train, 2, lr=0.05, progress=False)
    original = copy.deepcopy(model.state_dict())
    r = fxprune.compile(model, "dsa", fxprune.Budget(flops=0.5), data.example_inputs(), train_loader=data.train,
                        eval_loader=data.test, epochs=1 if trained else 2, finetune_epochs=1, progress=False)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())  # the user's model untouched
    with FlopCounterMode(display=False) as fc:
        r.model(data.example_inputs()[0])
    macs = fc.get_total_flops() // 2 // len(data.example_inputs()[0])
    assert macs <= r.report.target["flops"] and macs > 0.9 * r.report.target["flops"]  # filled up to the budget
    alphas = r.report.method_report["alpha"]
    assert len(alphas) == len([g for g in r.report.groups if g["prunable"]]) and max(alphas.values()) < 0.99
    assert r.report.accuracy["finetuned"] > 0.3 and r.report.method_report["recalibration_batches"] > 0


def test_bad_options_and_budgets_are_refused(data):
    with pytest.raises(ConfigError, match="score"):
        _prepared(data, score="taylor")
    with pytest.raises(ConfigError, match="warmup"):
        _prepared(data, warmup=1.0)
    with pytest.raises(ConfigError, match="latency"):
        fxprune.compile(build_model("resnet20", num_classes=10), "dsa", fxprune.Budget(latency=0.5),
                        data.example_inputs(), train_loader=data.train, epochs=1, progress=False)


def test_conv_bn_importance_is_filter_norm_times_gamma_over_sigma():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        net[1].weight.uniform_(-2, 2)
        net[1].running_var.uniform_(0.5, 3)
    gm = fxprune.trace(net, (torch.randn(1, 3, 8, 8),))
    cg = fxprune.analyze(gm)
    got = fxprune.scores.score("conv_bn", gm, cg, cg.prunable_groups[0])
    bn = net[1]
    want = net[0].weight.abs().sum((1, 2, 3)) * bn.weight.abs() / (bn.running_var + bn.eps).sqrt()
    assert np.allclose(got, want.detach().double().numpy())

    # torchvision resnet18 (trained-looking statistics): where a group has one producer, conv_bn / l1
    # is that producer's |gamma| / sigma; a residual stream sums its producers
    import torchvision

    model = torchvision.models.resnet18(weights=None).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(-2, 2)
                m.running_var.uniform_(0.5, 3)
    gm = fxprune.trace(model, (torch.randn(1, 3, 64, 64),))
    cg = fxprune.analyze(gm)
    single = 0
    for group in cg.prunable_groups:
        found = list(fxprune.scores.normed_producers(gm, cg, group))
        got = fxprune.scores.score("conv_bn", gm, cg, group)
        assert got.shape == (group.size,) and np.all(got > 0)
        if len(found) == 1 and found[0][2] is not None:
            norm = found[0][2]
            ratio = got / fxprune.scores.score("l1", gm, cg, group)
            assert np.allclose(ratio, (norm.weight.abs() / (norm.running_var + norm.eps).sqrt()).detach().double().numpy())
            single += 1
    assert single >= 8


def test_decide_re_estimates_the_norm_statistics_under_the_decided_masks_only_with_data(data):
    prepared = _prepared(data, steps=5)
    opt = torch.optim.SGD(prepared.model_parameters(), lr=0.05)
    for (x, y), _ in zip(data.train, range(5)):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(prepared.module(x), y).backward()
        opt.step()
        prepared.step(opt)
    norms = [m for m in prepared.module.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in norms]
    decision = prepared.method.decide(prepared.ctx)  # no data: nothing re-estimated
    assert all(torch.equal(m.running_mean, b) for m, b in zip(norms, before))
    assert prepared.method.recalibrated == 0
    pruned = fxprune.finalize(prepared, data=data.train)  # checked against the re-estimated gated model
    assert prepared.method.recalibrated == min(20, len(data.train))
    assert any(not torch.equal(m.running_mean, b) for m, b in zip(norms, before))
    assert all(m.momentum == 0.1 for m in norms) and prepared.module.training
    for gid, gate in prepared.method.gates.items():  # the masks held were the decision's
        assert torch.equal(gate.current.bool(), torch.as_tensor(prepared.decision.keep[gid]))
    assert {g: k.sum() for g, k in decision.keep.items()} == {g: k.sum() for g, k in prepared.decision.keep.items()}
    assert pruned is not None


@pytest.mark.parametrize("name", ["mobilenet_v2", "shufflenet_v2_x1_0", "densenet121"])
def test_search_and_finalize_on_torchvision_models(name):
    """Depthwise convs, channel shuffle and dense concatenation: masks per group, an exact budget."""
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=10)
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    prepared = fxprune.prepare(model, "dsa", fxprune.Budget(flops=0.4), (x,), total_steps=4, progress=False)
    opt = torch.optim.SGD(prepared.model_parameters(), lr=0.01)
    for _ in range(4):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(prepared.module(x), y).backward()
        opt.step()
        prepared.step(opt)
    assert prepared.method.logits.grad is None  # read and cleared by every outer update
    pruned = fxprune.finalize(prepared, data=[(x, y)] * 2)
    assert prepared.measured["macs"] <= prepared.targets.macs and prepared.method.recalibrated == 2
    assert pruned(x).shape == (4, 10)
