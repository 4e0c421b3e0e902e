"""DAIS (issue 10): annealed indicators, bi-level search on disjoint examples, exact budget."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import fxprune
from fxprune.data import digits_loaders
from fxprune.models import build_model
from fxprune.passes.gates import gate_sites
from fxprune.passes.methods.dais import indicator_rows


@pytest.fixture(scope="module")
def data():
    return digits_loaders(image_size=16, batch_size=32, seed=0)


def _prepared(data, steps: int = 40, budget: float = 0.5, **options):
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10)
    return fxprune.prepare(model, "dais", fxprune.Budget(flops=budget), data.example_inputs(), total_steps=steps,
                           **options)


def _opt(prepared) -> torch.optim.Optimizer:
    return torch.optim.SGD(prepared.model_parameters(), lr=0.05, momentum=0.9)


def _batches(data, n: int) -> list:
    out = []
    while len(out) < n:
        out += list(data.train)
    return out[:n]


def test_one_indicator_vector_per_group_shared_by_its_producers(data):
    prepared = _prepared(data)
    targets = {}
    for node in gate_sites(prepared.module):
        gate = prepared.module.get_submodule(node.target)
        targets.setdefault(gate.group_id, set()).add(node.target)
    assert all(len(t) == 1 for t in targets.values())  # a residual stream's producers share one gate
    streams = [g for g in prepared.channel_graph.prunable_groups if len(g.sites) > 1]
    assert streams and all(g.id in targets for g in streams)


def test_the_two_splits_never_share_an_example(data):
    seen = {False: set(), True: set()}
    for epoch in range(3):
        torch.manual_seed(epoch)  # another shuffle, other batches
        for x, _ in data.train:
            side = indicator_rows(x, 0.3)
            for row, s in zip(x, side.tolist()):
                seen[s].add(row.numpy().tobytes())
    assert not seen[False] & seen[True]
    share = len(seen[True]) / (len(seen[True]) + len(seen[False]))
    assert 0.2 < share < 0.4 and len(seen[True]) + len(seen[False]) == len(data.train.dataset)


def test_weight_step_moves_weights_only_and_indicator_step_alphas_only(data):
    prepared = _prepared(data)
    opt = _opt(prepared)
    alphas = prepared.method_parameters()
    weights = prepared.model_parameters()
    before_a = [a.detach().clone() for a in alphas]
    before_w = [w.detach().clone() for w in weights]
    x, y = next(iter(data.train))
    side = indicator_rows(x, 0.3)
    # the indicator rows alone: only the alphas move
    prepared.train_step((x[side], y[side]), opt)
    assert all(torch.equal(w, b) for w, b in zip(weights, before_w))
    assert any(not torch.equal(a, b) for a, b in zip(alphas, before_a))
    # the weight rows alone, without regularizers: the weights move, the alphas do not
    prepared = _prepared(data, lam=0.0, l1=0.0)
    opt = _opt(prepared)
    alphas, weights = prepared.method_parameters(), prepared.model_parameters()
    before_a = [a.detach().clone() for a in alphas]
    before_w = [w.detach().clone() for w in weights]
    prepared.train_step((x[~side], y[~side]), opt)
    assert any(not torch.equal(w, b) for w, b in zip(weights, before_w))
    assert all(torch.equal(a, b) for a, b in zip(alphas, before_a))


def test_temperature_anneals_and_indicators_binarize_to_the_budget(data):
    train = copy.copy(data)
    r = fxprune.compile(build_model("resnet20", num_classes=10), "dais", fxprune.Budget(flops=0.5),
                        data.example_inputs(), train_loader=train.train, eval_loader=data.test, epochs=3,
                        progress=False)
    ts = [e["extra"]["T"] for e in r.report.epochs]
    assert ts == sorted(ts, reverse=True) and ts[-1] == pytest.approx(0.02, rel=1e-6)
    assert r.report.method_report["undecided_fraction"] < 0.01  # annealing closed the gap
    assert r.report.accuracy["pruned"] == pytest.approx(r.report.accuracy["gated"], abs=0.02)
    with FlopCounterMode(display=False) as fc:
        r.model(data.example_inputs()[0])
    assert fc.get_total_flops() // 2 <= r.report.target["flops"]  # FLOPs counted by torch, not by fxprune
    assert fc.get_total_flops() // 2 > 0.5 * r.report.target["flops"]


def test_resume_mid_search_equals_an_uninterrupted_run(data):
    batches = _batches(data, 12)

    def run(prepared, opt, part):
        for b in part:
            prepared.train_step(b, opt)

    a = _prepared(data, steps=12)
    opt_a = _opt(a)
    run(a, opt_a, batches)
    b = _prepared(data, steps=12)
    opt_b = _opt(b)
    run(b, opt_b, batches[:5])
    state, opt_state = copy.deepcopy(b.state_dict()), copy.deepcopy(opt_b.state_dict())
    c = _prepared(data, steps=12)
    c.load_state_dict(state)
    opt_c = _opt(c)
    opt_c.load_state_dict(opt_state)
    run(c, opt_c, batches[5:])
    for (k, va), vc in zip(a.module.state_dict().items(), c.module.state_dict().values()):
        assert torch.equal(va, vc), k
    assert c.ctx.step == 12 and a.method.temperature(a.ctx) == c.method.temperature(c.ctx)


def test_decide_folds_the_surviving_soft_values(data):
    prepared = _prepared(data, steps=20)
    opt = _opt(prepared)
    for b in _batches(data, 20):
        prepared.train_step(b, opt)
    pruned = fxprune.finalize(prepared)
    d = prepared.decision
    for gid, keep in d.keep.items():
        if gid in d.scale:
            values = d.scale[gid].numpy()
            assert np.all(values[keep] > 0) and keep.any()
    assert prepared.measured["macs"] <= prepared.targets.macs
    assert pruned is not None


def test_lambda_grows_per_percent_while_over_budget_and_stops_at_lam_max(data):
    """Never meeting a 10% budget (no training moves alpha), lam compounds 1.2 per 1% of training
    (one step of 100) up to ``lam_max`` and holds there; a larger ceiling lets it run on."""
    trajectories = {}
    for ceiling in (100.0, 1e12):
        prepared = _prepared(data, steps=100, budget=0.1, lam_max=ceiling)
        lams = []
        for _ in range(40):
            prepared.step()
            lams.append(prepared.method.lam)
        trajectories[ceiling] = np.array(lams)
    free = trajectories[1e12]
    np.testing.assert_allclose(free, 1.2 ** np.arange(1, 41), rtol=1e-9)
    capped = trajectories[100.0]
    first = int(np.argmax(capped >= 100.0))
    np.testing.assert_allclose(capped[:first], free[:first], rtol=1e-9)
    assert first == int(np.ceil(np.log(100) / np.log(1.2))) - 1 and np.all(capped[first:] == 100.0)


def test_lam_max_below_lam_is_refused():
    with pytest.raises(fxprune.ConfigError, match="lam_max"):
        fxprune.passes.methods.dais.DAIS(lam=5.0, lam_max=1.0)
