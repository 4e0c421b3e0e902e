"""Weight sparsity (issue 13): budgets, the masks pass, the weight methods and their schedules,
finalize baking masks into plain weights, composition with channel pruning, export."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

import fxprune
import fxprune.passes.methods  # noqa: F401  (registers the built-in methods)
from fxprune import sparsity as sp
from fxprune.data import digits_loaders
from fxprune.errors import BudgetError, ConfigError
from fxprune.method import METHODS
from fxprune.passes.masks import has_masks
from helpers import resumed_equals_uninterrupted, run_steps

WEIGHT_METHODS = sorted(n for n, c in METHODS.items() if c.granularity == "weight")


class SmallNet(nn.Module):
    """Conv-BN-ReLU twice, a residual add, a depthwise conv and a classifier: something of every
    kind the weight selection treats differently (a first layer of 3 input channels, depthwise)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.conv3 = nn.Conv2d(8, 16, 1, bias=False)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.bn1(self.conv1(x)))
        b = torch.relu(self.bn2(self.conv2(a))) + a
        c = torch.relu(self.conv3(self.dw(b)))
        return self.fc(c.mean(dim=(2, 3)))


def _model(seed: int = 0) -> SmallNet:
    torch.manual_seed(seed)
    return SmallNet()


X = (torch.randn(2, 3, 8, 8),)


def _targets(budget: fxprune.Budget, model: nn.Module | None = None) -> sp.WeightTargets:
    gm = fxprune.trace(model or _model(), X)
    return budget.resolve(fxprune.CostModel(gm, fxprune.analyze(gm))).weights


def _weights(model: nn.Module, names) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n].detach() for n in names}


@pytest.fixture(scope="module")
def digits():
    return digits_loaders(batch_size=64, seed=0, image_size=8)


# ---- budgets ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, phrase", [
    (dict(sparsity=1.0), "in (0, 1)"), (dict(sparsity=0), "in (0, 1)"), (dict(sparsity="0.9"), "fraction"),
    (dict(sparsity=float("nan")), "in (0, 1)"), (dict(sparsity=0.9, scope="row"), "scope"),
    (dict(nm=(4, 2)), "0 < n < m"), (dict(nm=(2,)), "(n, m)"), (dict(nm="2:4"), "(n, m)"),
    (dict(sparsity=0.5, nm=(2, 4)), "not both"), (dict(sparsity=0.5, flops=0.5), "compile with the channel budget"),
    (dict(sparsity=0.5, dense_ends=1), "dense_ends"),
])
def test_bad_sparsity_budgets_are_config_errors(kwargs, phrase):
    with pytest.raises(ConfigError, match=None) as err:
        fxprune.Budget(**kwargs)
    assert phrase in str(err.value)


def test_prunable_weights_follow_the_channel_graph():
    t = _targets(fxprune.Budget(sparsity=0.5))
    assert list(t.sizes) == ["conv1.weight", "conv2.weight", "dw.weight", "conv3.weight", "fc.weight"]
    ends = _targets(fxprune.Budget(sparsity=0.5, dense_ends=True))
    assert set(ends.skipped) == {"conv1.weight", "fc.weight"} and "dense_ends" in ends.skipped["fc.weight"]
    nm = _targets(fxprune.Budget(nm=(2, 4)))  # 3 input channels; depthwise: 1 per group
    assert set(nm.skipped) == {"conv1.weight", "dw.weight"} and "groups of 4" in nm.skipped["dw.weight"]


def test_a_shared_weight_gets_one_mask():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)

        def forward(self, x):
            return self.fc(torch.relu(self.fc(x)))

    gm = fxprune.trace(Tied(), (torch.randn(2, 6),))
    t = fxprune.Budget(sparsity=0.5).resolve(fxprune.CostModel(gm, fxprune.analyze(gm))).weights
    assert t.sizes == {"fc.weight": 36}


def test_methods_refuse_the_other_kind_of_budget():
    with pytest.raises(ConfigError, match="removes channels"):
        fxprune.prepare(_model(), "l1", fxprune.Budget(sparsity=0.5), X)
    with pytest.raises(ConfigError, match="zeroes single weights"):
        fxprune.prepare(_model(), "gmp", fxprune.Budget(flops=0.5), X)
    for name in ("granet", "sculpt"):
        with pytest.raises(ConfigError, match="does not reach Budget\\(nm"):
            fxprune.prepare(_model(), name, fxprune.Budget(nm=(2, 4)), X, total_steps=10)
    with pytest.raises(ConfigError, match="does not reach Budget\\(sparsity"):
        fxprune.prepare(_model(), "nm", fxprune.Budget(sparsity=0.5), X, total_steps=10)


# ---- masks: exact counts --------------------------------------------------------------------------

@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.98])
def test_one_shot_masks_hit_the_target_exactly(scope, sparsity):
    budget = fxprune.Budget(sparsity=sparsity, scope=scope)
    result = fxprune.compile(_model(), "gmp", budget, X, progress=False)
    t = result.prepared.targets.weights
    masks = result.prepared.decision.weight_masks
    removed = {n: int((~m).sum()) for n, m in masks.items()}
    if scope == "global":
        assert sum(removed.values()) == round(sparsity * t.total)
    else:
        for n, size in t.sizes.items():
            assert abs(removed[n] - sparsity * size) <= 1, n  # to one weight per layer
    for n, w in _weights(result.model, t.sizes).items():  # baked: exactly the masks' zeros
        assert torch.equal(w == 0, ~masks[n]), n
    z = result.report.sparsity
    assert z["overall"] == pytest.approx(sum(removed.values()) / t.total)
    assert z["nonzero_macs"] < z["dense_macs"] and z["bytes_sparse"] < z["bytes_dense"]


def test_nm_masks_keep_exactly_n_in_every_group_of_m():
    result = fxprune.compile(_model(), "nm", fxprune.Budget(nm=(2, 4)), X, progress=False)
    t = result.prepared.targets.weights
    for name, w in _weights(result.model, t.sizes).items():
        groups = (w != 0).movedim(t.dims[name], -1).reshape(-1, 4).sum(1)
        assert bool((groups == 2).all()), name
    assert result.report.sparsity["overall"] == pytest.approx(0.5)
    for name in t.skipped:  # left dense, and said why
        assert bool((dict(result.model.named_parameters())[name] != 0).all())


def test_nm_mask_with_a_fraction_constrains_only_that_share_of_groups():
    w = torch.randn(8, 16, 3, 3)
    half = sp.nm_mask(w.abs(), 2, 4, 1, fraction=0.5)
    per_group = half.movedim(1, -1).reshape(-1, 4).sum(1)
    assert int((per_group == 2).sum()) == per_group.numel() // 2 and int((per_group == 4).sum()) == per_group.numel() // 2


def test_finalize_leaves_a_plain_module_and_the_user_model_untouched():
    model = _model()
    before = copy.deepcopy(model.state_dict())
    result = fxprune.compile(model, "gmp", fxprune.Budget(sparsity=0.8), X, progress=False)
    assert not has_masks(result.model) and not has_masks(model)
    assert all(not parametrize.is_parametrized(m) for m in result.model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert result.report.equivalence["max_rel_diff"] == 0.0


# ---- schedules ------------------------------------------------------------------------------------

def _prepared(method: str, budget: fxprune.Budget, total: int, model: nn.Module | None = None, x=X, **options):
    return fxprune.prepare(model or _model(), method, budget, x, total_steps=total, **options)


def test_cyclical_schedule_is_periodic_and_ends_at_the_target():
    p = _prepared("cyclical", fxprune.Budget(sparsity=0.9), 300, cycles=3, end=0.75)
    m, ctx = p.method, p.ctx
    s = [m.sparsity_at(ctx, step) for step in range(301)]
    assert s[0] == s[75] == s[150] == 0.0  # each cycle starts from s0
    assert s[74] == s[149] == s[224] == 0.9  # and reaches the target on its last step
    assert s[10:74] == s[85:149] == s[160:224]  # periodic
    assert all(v == 0.9 for v in s[225:])  # then fixed at the target
    assert all(a <= b for a, b in zip(s[:74], s[1:75]))  # rising within a cycle


def test_gmp_schedule_is_the_cubic_ramp():
    p = _prepared("gmp", fxprune.Budget(sparsity=0.8), 100, begin=0.2, end=0.6)
    s = [p.method.sparsity_at(p.ctx, t) for t in range(101)]
    assert s[20] == 0.0 and s[60] == 0.8 and s[40] == pytest.approx(0.8 * (1 - 0.5 ** 3))


def _planted(method: str, **options):
    """y = x w* with w* = (1, 1, 1, 0, 0, 0, 0, 1) and whitened x, started from w = (2, 2, 2, 2, .01, ...):
    at the first projection (step 19) w7 is still smaller than the useless w3, so it is pruned; with
    plain SGD at lr 0.0236 it would overtake w3 by step 39."""
    n = 64
    q, _ = torch.linalg.qr(torch.randn(n, 8, generator=torch.Generator().manual_seed(0)))
    x = q * n ** 0.5
    y = x @ torch.tensor([1.0, 1, 1, 0, 0, 0, 0, 1]).unsqueeze(1)
    model = nn.Sequential(nn.Linear(8, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[2.0, 2, 2, 2, 0.01, 0.01, 0.01, 0.01]]))
    p = fxprune.prepare(model, method, fxprune.Budget(sparsity=0.5), (x,), total_steps=40, **options)
    opt = torch.optim.SGD(p.model_parameters(), lr=0.0236)
    masks = {}
    for step in range(1, 41):
        loss = nn.functional.mse_loss(p.module(x), y)
        opt.zero_grad()
        loss.backward()
        p.after_backward()
        opt.step()
        p.step(opt)
        masks[step] = p.method.masks["0.weight"].mask.clone().view(-1)
    return p, masks


def test_a_weight_pruned_in_cycle_one_comes_back_in_cycle_two():
    p, masks = _planted("cyclical", cycles=2, end=1.0, interval=1000)
    assert not masks[19][7] and masks[19][3]  # end of cycle 1: the useful w7 is pruned
    assert masks[20].all()  # cycle 2 starts dense again
    assert masks[39][7] and not masks[39][3]  # end of cycle 2: w7 is back, w3 went
    w = fxprune.finalize(p).get_submodule("0").weight
    assert w.view(-1)[7] != 0 and w.view(-1)[3] == 0


def test_gmp_cannot_bring_a_pruned_weight_back():
    p, masks = _planted("gmp", begin=19 / 40, end=19 / 40, interval=1000)
    assert not masks[19][7]
    assert not masks[40][7]
    assert fxprune.finalize(p).get_submodule("0").weight.view(-1)[7] == 0


def _batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("method, options", [("cyclical", dict(cycles=2, interval=2)), ("granet", dict(interval=2)),
                                             ("sculpt", dict(cycles=2)), ("gmp", dict(interval=3))])
def test_resume_mid_schedule_equals_an_uninterrupted_run(method, options):
    batches = _batches(20)

    def setup():
        p = _prepared(method, fxprune.Budget(sparsity=0.8), len(batches), model=_model(1), **options)
        return p, torch.optim.SGD(p.model_parameters(), lr=0.05, momentum=0.9)

    a, c = resumed_equals_uninterrupted(setup, batches, 9)
    assert a.method.state_dict() == c.method.state_dict()
    for name in a.method.masks:
        assert torch.equal(a.method.masks[name].mask, c.method.masks[name].mask)


def test_fixed_mask_training_keeps_removed_weights_at_zero():
    batches = _batches(12)
    p = _prepared("gmp", fxprune.Budget(sparsity=0.7), len(batches), begin=0.25, end=0.5, interval=1)
    opt = torch.optim.SGD(p.model_parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    run_steps(p, batches, opt)
    for wm in p.method.masks.values():
        assert bool((wm.param.detach()[~wm.mask] == 0).all())


def test_granet_regrows_by_gradient_at_constant_density():
    batches = _batches(16)
    p = _prepared("granet", fxprune.Budget(sparsity=0.8), len(batches), begin=0.0, end=1.0, interval=4)
    opt = torch.optim.SGD(p.model_parameters(), lr=0.05)
    t = p.targets.weights
    run_steps(p, batches[:4], opt)
    first = {n: wm.mask.clone() for n, wm in p.method.masks.items()}
    run_steps(p, batches[4:], opt)
    assert p.method.regrown > 0
    removed = sum(int((~wm.mask).sum()) for wm in p.method.masks.values())
    assert removed == t.zeros()["*"]  # regrowth leaves the density where the schedule put it
    assert any(not torch.equal(first[n], wm.mask) for n, wm in p.method.masks.items())


def test_sculpt_starts_random_balanced_prunes_once_and_cycles_the_rate():
    p = _prepared("sculpt", fxprune.Budget(sparsity=0.9), 100, cycles=4, init_sparsity=0.2)
    m, ctx, t = p.method, p.ctx, p.targets.weights
    removed = sum(int((~wm.mask).sum()) for wm in m.masks.values())
    assert removed == round(0.2 * t.total)
    assert [m.sparsity_at(ctx, s) for s in (79, 80)] == [0.2, 0.9]  # one prune, at the end of cycle 4
    assert m.lr_factor(ctx, 0) == pytest.approx(0.2) and m.lr_factor(ctx, 4) == pytest.approx(1.0)
    assert m.lr_factor(ctx, 19) < 0.1 and m.lr_factor(ctx, 20) == pytest.approx(0.2)  # restarts each cycle


def test_lookahead_score_matches_its_formula_on_a_chain():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    gm = fxprune.trace(model, (torch.randn(2, 3),))
    cg = fxprune.analyze(gm)
    a, b, c = (model[i].weight.detach() for i in (0, 2, 4))
    scores = sp.lookahead_scores({"0.weight": a, "2.weight": b, "4.weight": c}, cg)
    want = b ** 2 * (a ** 2).sum(1).unsqueeze(0) * (c ** 2).sum(0).unsqueeze(1)
    torch.testing.assert_close(scores["2.weight"], want)
    torch.testing.assert_close(scores["0.weight"], a ** 2 * (b ** 2).sum(0).unsqueeze(1))  # input: factor 1


# ---- the flow ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", WEIGHT_METHODS)
def test_every_weight_method_trains_and_meets_its_budget(method, digits):
    budget = fxprune.Budget(nm=(2, 4)) if method == "nm" else fxprune.Budget(sparsity=0.5)
    torch.manual_seed(0)
    model = SmallNet()
    result = fxprune.compile(model, method, budget, digits.example_inputs(), train_loader=digits.train,
                             eval_loader=digits.test, epochs=2, lr=0.2, progress=False)
    z, t = result.report.sparsity, result.prepared.targets.weights
    if budget.sparsity:
        assert z["overall"] * t.total == pytest.approx(t.zeros()["*"])
    else:
        assert z["overall"] == pytest.approx(0.5)
    assert result.report.accuracy["pruned"] == result.report.accuracy["gated"]  # finalize changed nothing
    losses = [e["train_loss"] for e in result.report.epochs]
    assert losses[-1] < losses[0] < 2.5  # it learns under its masks (chance: ln 10 = 2.30 at the start)


def test_fine_tuning_a_sparse_model_keeps_its_zeros(digits):
    result = fxprune.compile(_model(), "gmp", fxprune.Budget(sparsity=0.9), digits.example_inputs(),
                             train_loader=digits.train, epochs=1, finetune_epochs=1, progress=False)
    masks = result.prepared.decision.weight_masks
    for name, w in _weights(result.model, masks).items():
        assert torch.equal(w == 0, ~masks[name]) or bool((w[~masks[name]] == 0).all()), name
    t = result.prepared.targets.weights
    assert result.report.sparsity["overall"] * t.total == pytest.approx(t.zeros()["*"])


def test_a_channel_pruned_model_can_then_be_sparsified():
    pruned = fxprune.compile(_model(), "l1", fxprune.Budget(flops=0.5), X, progress=False).model
    sparse = fxprune.compile(pruned, "gmp", fxprune.Budget(sparsity=0.8), X, progress=False)
    assert fxprune.count_macs(sparse.model, X) == fxprune.count_macs(pruned, X)
    assert sparse.report.sparsity["overall"] == pytest.approx(0.8, abs=1e-3)
    with torch.no_grad():  # the sparse model is the pruned one with zeros, nothing else changed
        masks = sparse.prepared.decision.weight_masks
        ref = copy.deepcopy(pruned)
        for name, mask in masks.items():
            ref.get_parameter(name).mul_(mask)
        torch.testing.assert_close(sparse.model(*X), ref(*X))


def test_a_missed_sparsity_budget_is_caught_after_finalize():
    from fxprune.decision import Decision

    class Lazy(fxprune.Method):  # a custom weight method that decides too few zeros
        name = "lazy-weights"
        granularity = "weight"

        def decide(self, ctx, data=None):
            return Decision({}, weight_masks={"conv2.weight": torch.zeros(8, 8, 3, 3, dtype=torch.bool)})

    p = fxprune.prepare(_model(), Lazy(), fxprune.Budget(sparsity=0.9), X)
    with pytest.raises(BudgetError, match="misses its sparsity budget"):
        fxprune.finalize(p)


def test_a_sparse_model_exports_exactly_to_onnx(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import numpy_helper

    result = fxprune.compile(_model(), "gmp", fxprune.Budget(sparsity=0.9), X, progress=False)
    exported = fxprune.export(result.model, tmp_path / "sparse.onnx", example_inputs=X)
    assert exported.max_abs_diff < 1e-5
    zeros = sum(int((numpy_helper.to_array(t) == 0).sum()) for t in onnx.load(str(exported.path)).graph.initializer)
    assert zeros >= result.report.sparsity["overall"] * result.prepared.targets.weights.total


def test_cli_compiles_a_sparsity_budget(tmp_path):
    from fxprune.flow.cli import main

    out = tmp_path / "run"
    assert main(["compile", "--method", "cyclical", "--sparsity", "0.9", "--epochs", "1", "--finetune-epochs", "0",
                 "--image-size", "8", "--out", str(out), "--no-progress"]) == 0
    import json

    report = json.loads((out / "report.json").read_text())
    z = report["sparsity"]
    assert z["overall"] * z["target"]["prunable_weights"] == pytest.approx(round(0.9 * z["target"]["prunable_weights"]))
    assert "weights:" in (out / "summary.txt").read_text()
    page = (out / "report.html").read_text()
    assert "Weight sparsity" in page and 'alt="sparsity per weight tensor" src="data:image/png;base64,' in page


def test_bench_runs_weight_methods_and_skips_what_they_cannot_reach(tmp_path):
    from fxprune.flow.bench import BenchConfig

    cfg = BenchConfig(methods=("gmp", "granet", "nm"), sparsity=(0.9, "2:4"), seeds=(0,), out=str(tmp_path / "b"))
    runs = {(m, t) for m, t, _ in cfg.runs()}
    assert runs == {("dense", 0.0), ("gmp", 0.9), ("granet", 0.9), ("gmp", "2:4"), ("nm", "2:4")}
    assert np.isclose(sp.cubic(5, 0, 10, 0.8), 0.8 * (1 - 0.5 ** 3))


def test_a_sparse_model_saves_and_loads_with_its_zeros(tmp_path):
    result = fxprune.compile(_model(), "gmp", fxprune.Budget(sparsity=0.9), X, progress=False)
    fxprune.save(result.model, tmp_path / "m.fxprune")
    loaded = fxprune.load(_model(5), tmp_path / "m.fxprune", X)
    for name, w in _weights(result.model, result.prepared.targets.weights.sizes).items():
        assert torch.equal(dict(loaded.named_parameters())[name], w)
    torch.testing.assert_close(loaded(*X), result.model(*X))


def test_a_layer_emptied_by_the_global_threshold_is_reported():
    model = _model()
    with torch.no_grad():
        model.conv3.weight.mul_(1e-6)  # far below every other weight: one global threshold takes it all
    with pytest.warns(fxprune.FxpruneWarning, match="conv3.weight kept no non-zero weight"):
        result = fxprune.compile(model, "gmp", fxprune.Budget(sparsity=0.5), X, progress=False)
    assert result.report.sparsity["empty"] == ["conv3.weight"]
    assert "no non-zero weight left in conv3.weight" in result.report.summary()
