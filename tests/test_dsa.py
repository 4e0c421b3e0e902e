"""DSA (issues 10, 28): keep probabilities solved per group against the official S-curve, straight-through
and implicit gradients (also against a Monte-Carlo finite difference of the expected loss), masks past the
activation (exact), the beta2 and rho schedules, the quadratic budget, a search that ends on the budget."""
from __future__ import annotations

import copy
import math

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
from fxprune.passes import finalize as finalize_pass
from fxprune.passes.methods.dsa import keep_probabilities, solve_offset
from fxprune.schedules import AdaptiveWeight, linear_path
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
    assert method.rho.value > method.options.rho


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
    assert torch.equal(a.method.u, c.method.u) and a.method.rho.value == c.method.rho.value and c.ctx.step == 10
    assert torch.equal(a.method.beta2, c.method.beta2)


@pytest.mark.parametrize("trained", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["from_scratch", "from_trained"])
def test_budget_met_exactly_from_scratch_and_from_a_trained_model(data, trained):
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10)
    if trained:
        train(model, data.train, 2, lr=0.05, progress=False)
    original = copy.deepcopy(model.state_dict())
    r = fxprune.compile(model, "dsa", fxprune.Budget(flops=0.5), data.example_inputs(), train_loader=data.train,
                        eval_loader=data.test, epochs=1 if trained else 2, finetune_epochs=1, progress=False,
                        bn_recalibration=4)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())  # the user's model untouched
    with FlopCounterMode(display=False) as fc:
        r.model(data.example_inputs()[0])
    macs = fc.get_total_flops() // 2 // len(data.example_inputs()[0])
    assert macs <= r.report.target["flops"] and macs > 0.9 * r.report.target["flops"]  # filled up to the budget
    alphas = r.report.method_report["alpha"]
    assert len(alphas) == len([g for g in r.report.groups if g["prunable"]]) and max(alphas.values()) < 0.99
    assert r.report.accuracy["finetuned"] > 0.3 and r.report.bn_recalibration["batches"] == 4
    report = r.report.method_report
    assert report["gates_past_activation"] == 10 and report["beta2"] == pytest.approx(20.0)
    assert report["decide_added"] + report["decide_removed"] >= 0 and report["budget_fraction_of_alpha"] > 0


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
    pruned = fxprune.finalize(prepared, data=[(x, y)] * 2, bn_recalibration=2)
    assert prepared.measured["macs"] <= prepared.targets.macs and prepared.bn_stats.batches == 2
    assert pruned(x).shape == (4, 10)


# ---- issue 28: the gradient to alpha, the masks' placement, the schedules, the search's end ----------------------

def _conv_net() -> nn.Module:
    def block(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(3, 16), *block(16, 24, 2), *block(24, 32, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, 10))


@pytest.fixture(scope="module")
def trained_net(data):
    torch.manual_seed(0)
    net = _conv_net()
    train(net, data.train, 4, lr=0.05, progress=False)
    return net


def _alpha_gradients(prepared, batches, samples: int = 2, delta: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """dL/da per group: the method's estimate (straight-through + implicit) averaged over ``batches``,
    and a central finite difference of the expected loss E_m[L(m)], m ~ Bernoulli(p(a)), estimated
    with common random numbers (the same uniforms u on both sides: m = u < p)."""
    method, module = prepared.method, prepared.module
    module.train()
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.0  # the forwards below leave the running statistics as they are
    estimate = torch.zeros(len(method.order), dtype=torch.float64)
    for x, y in batches:
        method.logits.grad = None
        torch.nn.functional.cross_entropy(module(x), y).backward()
        estimate += method.logits.grad
    method.logits.grad = None
    method.sample = lambda *args: None  # the masks are set by hand below
    method.refresh_importance(prepared.ctx)
    probs = {}
    with torch.no_grad():
        base = method.logits.detach().clone()
        for k in range(len(method.order)):
            for sign in (1, -1):
                method.logits.copy_(base)
                method.logits[k] += sign * delta
                probs[k, sign] = method.probabilities()
        method.logits.copy_(base)
        gen = torch.Generator().manual_seed(1)
        fd = torch.zeros(len(method.order), dtype=torch.float64)
        for x, y in batches:
            for _ in range(samples):
                u = torch.rand(probs[0, 1].shape, generator=gen, dtype=torch.float64)
                for k in range(len(method.order)):
                    for sign in (1, -1):
                        masks = (u < probs[k, sign]).float()
                        for j, gid in enumerate(method.order):
                            method.gates[gid].current = masks[j, : method.gates[gid].units]
                        fd[k] += sign * float(torch.nn.functional.cross_entropy(module(x), y)) / (2 * delta)
    return (estimate / len(batches)).numpy(), (fd / (samples * len(batches))).numpy()


@pytest.mark.parametrize("past", [True, False], ids=["past_relu", "before_relu"])
def test_alpha_gradient_follows_the_expected_loss_on_a_trained_model(data, trained_net, past):
    """At alpha = 0.8 on a trained net, lowering a group's keep ratio raises the expected loss. The mask on
    the ReLU's output reports it (same sign as the finite difference, within a factor 4); the official
    placement, before the ReLU, does not (a dropped unit feeds ReLU(0), whose gradient is 0)."""
    prepared = fxprune.prepare(trained_net, "dsa", fxprune.Budget(flops=0.5), data.example_inputs(), total_steps=10,
                               progress=False, init=math.log(0.8 / 0.2), gate_past_activation=past)
    torch.manual_seed(0)  # the same 16 batches whatever ran before (the loader shuffles with the global RNG)
    estimate, fd = _alpha_gradients(prepared, list(data.train)[:16])
    assert np.all(fd < 0)  # removing units of a trained net costs loss
    ratio = estimate / fd
    if past:  # every group the right sign; on average within 3x (the official placement: ~0.1x)
        assert np.all((ratio > 0.1) & (ratio < 4)) and 0.3 < ratio.mean() < 3, (estimate, fd)
    else:
        assert estimate.mean() / fd.mean() < 0.25, (estimate, fd)  # ~0 but where a unit is not at equilibrium


def test_the_mask_past_the_activation_computes_the_same_network(data, trained_net):
    """Gates move past a zero-preserving activation that is the norm's only user (not past a sigmoid, nor
    where the norm has two users), and with binary masks the gated network equals the finalized one."""
    torch.manual_seed(0)
    net = nn.Sequential(*list(copy.deepcopy(trained_net))[:6], nn.Conv2d(24, 8, 1), nn.BatchNorm2d(8), nn.Sigmoid(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    x = data.example_inputs()[0]
    for past in (True, False):
        prepared = fxprune.prepare(net, "dsa", fxprune.Budget(flops=0.5), (x,), total_steps=10, progress=False,
                                   gate_past_activation=past)
        inputs = {prepared.module.get_submodule(n.target).group_id: n.args[0] for n in gate_sites(prepared.module)}
        kinds = {gid: type(prepared.module.get_submodule(node.target)).__name__ for gid, node in inputs.items()}
        assert kinds == ({0: "ReLU", 1: "ReLU", 2: "BatchNorm2d"} if past else dict.fromkeys(inputs, "BatchNorm2d"))
        assert prepared.method.moved == (2 if past else 0)
    rng = np.random.default_rng(0)
    prepared = fxprune.prepare(net, "dsa", fxprune.Budget(flops=0.5), (x,), total_steps=10, progress=False)
    prepared.method.sample = lambda *args: None
    for _ in range(3):
        keep = {gid: rng.random(g.units) < 0.6 for gid, g in prepared.method.gates.items()}
        for gid, k in keep.items():
            k[rng.integers(len(k))] = True
            prepared.method.gates[gid].current = torch.as_tensor(k, dtype=torch.float32)
        prepared.module.eval()
        pruned = finalize_pass(prepared.module, prepared.channel_graph, fxprune.Decision(keep))
        with torch.no_grad():
            assert torch.allclose(prepared.module(x), pruned(x), atol=1e-5)


def test_the_s_curve_is_the_official_one_and_beta2_grows_over_the_search(data):
    """p = clip(1 / (1 + exp(clip(beta2 (log beta1 - log b), -20, 20))) + 0.01, 0, 1) as official
    ``sigmoid_log_lbeta1`` writes it, at the offset solved for alpha; beta2 starts at the official init
    (softplus(invsp_beta_2) = 1) and rises linearly to ``beta2_final`` over the search after the warmup; rho
    grows as ``AdaptiveWeight`` (x(1 + rho_rate) per 1% of the search)."""
    log_b, valid = _padded([7, 16])
    for beta2 in (1.0, 5.0, 20.0):
        alpha = torch.tensor([0.3, 0.7], dtype=torch.float64)
        b2 = torch.full((2,), beta2, dtype=torch.float64)
        t = solve_offset(log_b, valid, alpha, b2)
        official = torch.clamp(1 / (1 + torch.exp(torch.clamp(beta2 * (t[:, None] - log_b), -20, 20))) + 0.01, 0, 1)
        assert torch.allclose(keep_probabilities(log_b, valid, alpha, beta2)[valid], official[valid], atol=1e-6)
    steps, warmup = 20, 0.25
    prepared = _prepared(data, steps=steps, warmup=warmup, beta2_final=12.0, rho=0.02, rho_rate=0.1)
    method = prepared.method
    assert float(method.beta2[0]) == 1.0 == pytest.approx(float(torch.nn.functional.softplus(
        torch.tensor(math.log(math.e - 1)))))
    opt = torch.optim.SGD(prepared.model_parameters(), lr=0.05)
    rho = AdaptiveWeight(0.02, 0.1, round(steps * (1 - warmup)))
    for (x, y), n in zip(data.train, range(steps)):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(prepared.module(x), y).backward()
        opt.step()
        prepared.step(opt)
        searched = n + 1 - round(steps * warmup)
        want = linear_path(1.0, 12.0, min(max(searched / (steps - round(steps * warmup)), 0.0), 1.0))
        assert torch.allclose(method.beta2, torch.full_like(method.beta2, want)), n
        if n + 1 > round(steps * warmup):
            rho.update(grow=True)
        assert method.rho.value == pytest.approx(rho.value), n
    assert float(method.beta2[0]) == pytest.approx(12.0)
    assert method.rho.value == pytest.approx(0.02 * 1.1 ** 100)


def test_the_search_ends_on_the_budget_and_decide_changes_little(data, trained_net):
    """From a trained net at 50% FLOPs, the search's own F(alpha) ends on the budget (not far below it, where
    the budget projection alone drove alpha), so the allocator's rounding changes only a few units."""
    steps = 3 * len(data.train)
    prepared = fxprune.prepare(trained_net, "dsa", fxprune.Budget(flops=0.5), data.example_inputs(), total_steps=steps,
                               progress=False)
    opt = torch.optim.SGD(prepared.model_parameters(), lr=0.02, momentum=0.9)
    for epoch in range(3):
        for x, y in data.train:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(prepared.module(x), y).backward()
            opt.step()
            prepared.step(opt)
    method = prepared.method
    fraction = float(method.flops(method.alphas().detach()))
    decision, cut = method.decide(prepared.ctx), method.cut()
    changed = sum(int((decision.keep[g] != cut[g]).sum()) for g in cut)
    units = sum(len(c) for c in cut.values())
    print(f"F(alpha)/budget {fraction:.3f}, decide changed {changed} of {units} units")
    assert 0.85 <= fraction <= 1.05 and changed <= 0.05 * units
    report = method.report(prepared.ctx)
    assert report["budget_fraction_of_alpha"] == pytest.approx(fraction)
    assert report["decide_added"] + report["decide_removed"] == changed
