"""Op rules (one owner per op kind), ``register_op``, and the soundness fixes of spine v2:
sizes read from channel dims, spatial splits, shuffles under many gate patterns, parametrized
weights, NaN and crashing finalized models in the equivalence check."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torchvision

import fxprune
from fxprune.rules.base import REGISTRY
from fxprune.passes import finalize, insert_gates
from fxprune.passes.verify import check_equivalence
from test_spine_zoo import analyzed, calibrate, group_of, prune_and_check, prune_and_check_seeds, set_random_gates


# ---- register_op: a custom per-channel normalization layer ----------------------------------------
class FRN(nn.Module):
    """Filter response normalization with a thresholded linear unit: per channel, but built from
    ops (pow, rsqrt, maximum with a parameter) that the analysis does not follow on its own."""

    def __init__(self, c: int, eps: float = 1e-6):
        super().__init__()
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, c))
        self.beta = nn.Parameter(torch.linspace(-0.3, 0.3, c))
        self.tau = nn.Parameter(torch.full((c,), -0.2))
        self.num_channels, self.eps = c, eps

    def forward(self, x):
        nu2 = x.pow(2).mean(dim=(2, 3), keepdim=True)
        y = self.gamma.view(1, -1, 1, 1) * x * torch.rsqrt(nu2 + self.eps) + self.beta.view(1, -1, 1, 1)
        return torch.maximum(y, self.tau.view(1, -1, 1, 1))


class WithFRN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = FRN(8)
        self.mid = nn.Conv2d(8, 6, 1)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.mid(self.norm(self.conv(x)))))


@pytest.fixture
def frn_registered():
    fxprune.register_op(FRN, fxprune.rules.per_channel(params=("gamma", "beta", "tau"), affine=(),
                                                       size_attr="num_channels", name="frn"))
    yield
    del REGISTRY.modules[FRN]


def test_unregistered_custom_layer_blocks_its_channels_and_names_register_op():
    _, _, gm, cg = analyzed(WithFRN())
    g = group_of(cg, "conv")
    assert not g.prunable and "register_op" in g.reason


def test_registered_custom_layer_is_a_leaf_prunable_and_finalizes_exactly(frn_registered):
    model, x, gm, cg = analyzed(WithFRN())
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["conv", "norm", "mid", "head"]
    g = group_of(cg, "conv")
    assert g.prunable, g.reason
    owned = {(s.module_path, s.param) for s in g.slices}
    assert {("norm", "gamma"), ("norm", "beta"), ("norm", "tau")} <= owned
    for seed in range(3):
        res = prune_and_check(model, x, gm, cg, seed=seed)
        norm = res["fin"].get_submodule("norm")
        assert norm.num_channels == norm.gamma.numel() == res["report"].kept[g.id] < 8


def test_register_op_refuses_a_second_rule_without_replace(frn_registered):
    with pytest.raises(fxprune.ConfigError, match="replace=True"):
        fxprune.register_op(FRN, fxprune.rules.elementwise())
    with pytest.raises(fxprune.ConfigError, match="OpRule"):
        fxprune.register_op(FRN, "per_channel")


def test_one_rule_serves_analysis_and_finalize():
    """The rule a node resolves to is the one finalize uses to fold and resize: BatchNorm's rule
    lists its affine params (gate anchor) and resizes num_features."""
    from fxprune.rules import Category, rule_for

    bn_net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    _, _, gm, cg = analyzed(bn_net)
    modules = dict(gm.named_modules())
    node = next(n for n in gm.graph.nodes if n.target == "1")
    rule = rule_for(node, modules)
    assert rule.category is Category.NORM and rule.gate_params(gm, node) == [("1.weight", 0), ("1.bias", 0)]
    gated, gates = insert_gates(gm, cg)
    gate_node = next(n for n in gated.graph.nodes if str(n.target).startswith("fxprune_gates"))
    assert gate_node.args[0].target == "1"  # the gate sits after the BN, whose params it folds into
    set_random_gates(gates)
    fin = finalize(gated, cg)
    assert fin.get_submodule("1").num_features == fin.get_submodule("1").weight.numel() < 8


# ---- sizes read from channel dims (bug A) -----------------------------------------------------------
class ViewAfterMatmul(nn.Module):
    """``C`` read from x (a prunable group) reshapes ``v @ attn``: v's channels are behind an opaque
    matmul and stay whole, so the view must keep the dense C while x shrinks."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.q, self.k, self.v = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1), nn.Conv2d(8, 8, 1)
        self.proj = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        B, C, H, W = x.shape
        attn = torch.softmax(self.q(x).view(B, -1, H * W).transpose(1, 2) @ self.k(x).view(B, -1, H * W), -1)
        y = (self.v(x).view(B, -1, H * W) @ attn.transpose(1, 2)).view(B, C, H, W)
        return self.head(torch.relu(self.proj(y)) * x.size(1) / 8)


def test_size_read_from_a_pruned_group_never_reshapes_another_tensor():
    model, x, gm, cg = analyzed(ViewAfterMatmul(), (1, 3, 6, 6))
    stem = group_of(cg, "stem")
    assert stem.prunable, stem.reason
    assert not group_of(cg, "v").prunable  # behind the matmul
    assert cg.channel_sizes and cg.size_uses
    for seed in range(4):
        res = prune_and_check(model, x, gm, cg, seed=seed)
        assert res["report"].kept[stem.id] < 8
        x3 = torch.randn(3, 3, 6, 6)  # the batch size is still read at run time
        with torch.no_grad():
            assert torch.allclose(res["fin"](x3), res["gated"](x3), rtol=1e-4, atol=1e-5)


class FlattenBySize(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8 * 36, 5)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.fc(y.view(y.size(0), y.size(1) * y.size(2) * y.size(3)))


def test_flatten_with_sizes_read_at_run_time_keeps_a_dynamic_batch():
    model, x, gm, cg = analyzed(FlattenBySize())
    for res in prune_and_check_seeds(model, x, gm, cg):
        with torch.no_grad():
            x4 = torch.randn(4, 3, 8, 8)
            assert torch.allclose(res["fin"](x4), res["gated"](x4), rtol=1e-4, atol=1e-5)


# ---- spatial split (bug B) --------------------------------------------------------------------------
class SpatialSplit(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        top, bottom = torch.split(y, [3, 5], dim=2)
        return self.head(torch.cat([self.a(top), self.b(bottom)], dim=2))


def test_split_along_a_spatial_dim_keeps_its_literal_sizes():
    model, x, gm, cg = analyzed(SpatialSplit())
    assert group_of(cg, "conv").prunable
    for res in prune_and_check_seeds(model, x, gm, cg):
        split = next(n for n in res["fin"].graph.nodes if n.target is torch.split)
        dim = split.kwargs.get("dim", split.args[2] if len(split.args) > 2 else 0)
        assert list(split.args[1]) == [3, 5] and dim == 2


# ---- channel shuffle under many gate patterns (bug C) -------------------------------------------------
@pytest.mark.parametrize("seed", range(3))
def test_shufflenet_224_random_gate_patterns(seed):
    torch.manual_seed(0)
    model = torchvision.models.shufflenet_v2_x1_0(weights=None).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    calibrate(model, x)
    gm = fxprune.trace(model, (x,))
    prune_and_check(model, x, gm, fxprune.analyze(gm), seed=seed)


# ---- parametrized weights --------------------------------------------------------------------------
class WeightNormed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.wn = nn.utils.parametrizations.weight_norm(nn.Conv2d(8, 8, 3, padding=1))
        self.mid = nn.Conv2d(8, 6, 1)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.mid(torch.relu(self.wn(torch.relu(self.conv(x)))))))


def test_parametrized_conv_blocks_its_channels_with_a_reason():
    model, x, gm, cg = analyzed(WeightNormed())
    g = group_of(cg, "conv")
    assert not g.prunable and "parametrization" in g.reason
    assert group_of(cg, "mid").prunable
    prune_and_check_seeds(model, x, gm, cg)


# ---- the equivalence check ---------------------------------------------------------------------------
def _pruned_pair():
    model, x, gm, cg = analyzed(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)))
    gated, gates = insert_gates(gm, cg)
    set_random_gates(gates)
    return gated, finalize(gated, cg), x


def test_nan_in_the_candidate_is_a_mismatch():
    gated, fin, x = _pruned_pair()
    broken = copy.deepcopy(fin)
    with torch.no_grad():
        broken.get_submodule("3").bias[0] = float("nan")
    with pytest.raises(fxprune.EquivalenceError):
        check_equivalence(gated, broken, (x,))


def test_nan_in_the_gated_module_is_reported_as_such():
    gated, fin, x = _pruned_pair()
    with torch.no_grad():
        gated.get_submodule("3").bias[0] = float("inf")
    with pytest.raises(fxprune.EquivalenceError, match="gated module itself outputs NaN or Inf"):
        check_equivalence(gated, fin, (x,))


def test_a_finalized_module_that_crashes_is_an_equivalence_error_naming_the_node():
    gated, fin, x = _pruned_pair()
    broken = copy.deepcopy(fin)
    conv = broken.get_submodule("3")
    conv.weight = nn.Parameter(torch.zeros(4, conv.weight.shape[1] + 1, 1, 1))
    with pytest.raises(fxprune.EquivalenceError, match="fails at node '_3'") as info:
        check_equivalence(gated, broken, (x,))
    assert info.value.node == "_3"


def test_finalized_model_shares_nothing_with_the_gated_one():
    gated, fin, _ = _pruned_pair()
    ours = {id(t) for t in list(fin.parameters()) + list(fin.buffers())}
    assert not ours & {id(t) for t in list(gated.parameters()) + list(gated.buffers())}


# ---- one removed channel, two consumers (the cause of timm repvgg_a2's crash) -------------------------
class TwoConsumers(nn.Module):
    """RepVGG-style: the same input feeds a padded 3x3 conv (cannot absorb a constant into its
    bias exactly: the zero padding breaks it) and a 1x1 conv (can). A removed channel carrying a
    BN constant must then stay for both, and neither bias may absorb it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.k3 = nn.Conv2d(8, 6, 3, padding=1)
        self.k1 = nn.Conv2d(8, 6, 1)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = self.bn(self.conv(x)) + 1.0  # removed channels carry the constant 1 + BN shift
        return self.head(torch.relu(self.k1(y) + self.k3(y)))


@pytest.mark.parametrize("seed", range(3))
def test_a_constant_one_consumer_cannot_absorb_stays_for_all_consumers(seed):
    model, x, gm, cg = analyzed(TwoConsumers())
    with torch.no_grad():
        model.bn.bias.uniform_(-1, 1)
    gm = fxprune.trace(model, (x,))
    cg = fxprune.analyze(gm)
    res = prune_and_check(model, x, gm, cg, seed=seed)
    assert res["report"].retained  # the padded 3x3 conv kept the constant channels


@pytest.mark.usefixtures("one_torch_thread")
def test_timm_repvgg_a2_finalizes():
    timm = pytest.importorskip("timm", reason="timm is a dev dependency: pip install -e '.[dev]'")
    torch.manual_seed(0)
    model = timm.create_model("repvgg_a2", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    calibrate(model, x)
    gm = fxprune.trace(model, (x,))
    prune_and_check_seeds(model, x, gm, fxprune.analyze(gm))


def test_a_consumer_reading_a_gate_directly_finalizes():
    """Linear -> Linear with no op between: the consumer's input in the gated graph is the gate
    itself (a 2-D tensor), so the recorded removed channels are taken along its last dim."""
    model, x, gm, cg = analyzed(nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4), nn.Linear(4, 3)), (2, 8))
    for seed in range(3):
        prune_and_check(model, x, gm, cg, seed=seed)


# ---- rules are not inherited by subclasses that compute something else (issue 30 §1) ------------------
class BNThenTanh(nn.BatchNorm2d):
    """A BatchNorm subclass whose forward adds a non-linearity: BatchNorm's rule would fold a gate
    after it into gamma and beta, through the tanh."""

    def forward(self, x):
        return torch.tanh(super().forward(x))


class BNThenTanhUntraceable(BNThenTanh):
    def forward(self, x):
        if x.mean() > 1e9:  # value-dependent: this module becomes an opaque leaf
            return x
        return torch.tanh(super().forward(x))


class InitBN(nn.BatchNorm2d):
    """Only a different initialisation: computes what BatchNorm2d computes."""

    def reset_parameters(self):
        super().reset_parameters()
        with torch.no_grad():
            self.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(0))


class ReflectConv(nn.Conv2d):
    """Overrides the method Conv2d's forward calls, not forward itself."""

    def _conv_forward(self, x, weight, bias):
        return nn.functional.conv2d(nn.functional.pad(x, (1, 1, 1, 1), mode="reflect"), weight, bias)


def _bn_net(norm: type) -> nn.Module:
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm(8), nn.Conv2d(8, 6, 1), nn.ReLU(), nn.Conv2d(6, 4, 1))
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(1))
        net[1].running_var.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(2))
        net[1].bias.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(3))
    return net


def test_subclass_overriding_forward_does_not_inherit_its_bases_rule():
    assert REGISTRY.module_rule(BNThenTanh(8)) is None
    assert REGISTRY.module_rule(ReflectConv(3, 8, 3)) is None  # overrides a method forward calls
    assert REGISTRY.module_rule(nn.BatchNorm2d(8)).name == "batch_norm"
    # traced through instead: F.batch_norm then tanh, each with its own rule
    model, x, gm, cg = analyzed(_bn_net(BNThenTanh))
    assert "1" not in [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert group_of(cg, "_0").prunable
    for seed in range(3):
        prune_and_check(model, x, gm, cg, seed=seed)


def test_subclass_leaf_that_overrides_forward_blocks_with_a_reason():
    _, _, gm, cg = analyzed(_bn_net(BNThenTanhUntraceable))
    assert "1" in gm.meta["fxprune_leaf_modules"]
    g = group_of(cg, "_0")
    assert not g.prunable
    assert "BNThenTanhUntraceable" in g.reason and "subclasses BatchNorm2d" in g.reason and "register_op" in g.reason


def test_the_inherited_rule_would_have_lied():
    """What the lookup prevents: registering BatchNorm's rule for the tanh subclass (the user says
    so) puts the gate after it and folds gate values through tanh; finalize's check catches it."""
    fxprune.register_op(BNThenTanh, REGISTRY.modules[nn.BatchNorm2d])
    try:
        model, x, gm, cg = analyzed(_bn_net(BNThenTanh))
        gated, gates = insert_gates(gm, cg)
        set_random_gates(gates)
        with pytest.raises(fxprune.EquivalenceError):
            finalize(gated, cg)
    finally:
        del REGISTRY.modules[BNThenTanh]


def test_subclass_that_only_changes_init_inherits():
    assert REGISTRY.module_rule(InitBN(8)) is REGISTRY.modules[nn.BatchNorm2d]
    model, x, gm, cg = analyzed(_bn_net(InitBN))
    assert "1" in [n.target for n in gm.graph.nodes if n.op == "call_module"]  # a leaf with BN's rule
    for seed in range(3):
        res = prune_and_check(model, x, gm, cg, seed=seed)
        assert res["fin"].get_submodule("1").num_features == res["report"].kept[group_of(cg, "_0").id] < 8


class Scale(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, c))

    def forward(self, x):
        return x * self.s.view(1, -1, 1, 1)


class LoggedScale(Scale):
    calls = 0

    def forward(self, x):
        type(self).calls += 1
        return super().forward(x)


def test_rule_with_subclasses_true_and_user_registration_of_a_subclass():
    import dataclasses

    rule = fxprune.rules.per_channel(params=("s",), name="scale")
    fxprune.register_op(Scale, rule)
    try:
        assert REGISTRY.module_rule(LoggedScale(4)) is None  # overrides forward: not by default
        fxprune.register_op(Scale, dataclasses.replace(rule, subclasses=True), replace=True)
        assert REGISTRY.module_rule(LoggedScale(4)).name == "scale"
        fxprune.register_op(Scale, rule, replace=True)
        own = fxprune.rules.per_channel(params=("s",), name="logged scale")
        fxprune.register_op(LoggedScale, own)  # the user vouches for the subclass itself
        assert REGISTRY.module_rule(LoggedScale(4)) is own
        net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), LoggedScale(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
        model, x, gm, cg = analyzed(net)
        assert "1" in [n.target for n in gm.graph.nodes if n.op == "call_module"]
        assert ("1", "s") in {(s.module_path, s.param) for s in group_of(cg, "_0").slices}
        for seed in range(2):
            prune_and_check(model, x, gm, cg, seed=seed)
    finally:
        REGISTRY.modules.pop(Scale, None)
        REGISTRY.modules.pop(LoggedScale, None)


def test_register_named_checks_its_arguments():
    with pytest.raises(fxprune.ConfigError, match="qualified class name"):
        fxprune.rules.register_named("BatchNormAct2d", fxprune.rules.elementwise())
    with pytest.raises(fxprune.ConfigError, match="OpRule"):
        fxprune.rules.register_named("pkg.mod.Layer", "per_channel")
    with pytest.raises(fxprune.ConfigError, match="replace=True"):
        fxprune.rules.register_named("timm.layers.norm_act.BatchNormAct2d", fxprune.rules.elementwise())


# ---- timm's norm-act layers ----------------------------------------------------------------------
def _norm_act_net(norm: nn.Module, cin: int = 8) -> nn.Module:
    net = nn.Sequential(nn.Conv2d(3, cin, 3, padding=1), norm, nn.Conv2d(cin, 6, 1), nn.ReLU(),
                        nn.Conv2d(6, 4, 1))
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, t in list(norm.named_parameters()) + list(norm.named_buffers()):
            if t.is_floating_point():
                t.copy_(torch.empty_like(t).uniform_(0.5, 1.5, generator=gen) if "var" in name or name == "weight"
                        else torch.empty_like(t).uniform_(-0.5, 0.5, generator=gen))
    return net


@pytest.mark.parametrize("act", ["hard_swish", "silu", "relu6"])
def test_timm_batchnorm_act_gets_norm_then_act_and_finalizes_exactly(act):
    timm = pytest.importorskip("timm")
    norm = timm.layers.BatchNormAct2d(8, act_layer=act)
    model, x, gm, cg = analyzed(_norm_act_net(norm))
    assert REGISTRY.module_rule(norm).name == "batch_norm + act"
    assert "1" in [n.target for n in gm.graph.nodes if n.op == "call_module"]  # one leaf, its own forward
    g = group_of(cg, "_0")
    assert g.prunable, g.reason
    assert {("1", p) for p in ("weight", "bias", "running_mean", "running_var")} \
        <= {(s.module_path, s.param) for s in g.slices}
    gated, _ = insert_gates(gm, cg)
    gate = next(n for n in gated.graph.nodes if str(n.target).startswith("fxprune_gates"))
    assert gate.args[0].target == "0"  # before the norm: a gate after the activation cannot fold
    for seed in range(3):
        res = prune_and_check(model, x, gm, cg, seed=seed)
        fin_norm = res["fin"].get_submodule("1")
        assert fin_norm.num_features == fin_norm.weight.numel() == res["report"].kept[g.id] < 8


def test_timm_group_norm_act_prunes_whole_norm_groups():
    timm = pytest.importorskip("timm")
    norm = timm.layers.GroupNormAct(8, num_groups=4, act_layer="silu")
    model, x, gm, cg = analyzed(_norm_act_net(norm))
    g = group_of(cg, "_0")
    assert g.prunable and g.size == 4  # one unit per norm group of 2 channels
    for seed in range(3):
        res = prune_and_check(model, x, gm, cg, seed=seed)
        fin_norm = res["fin"].get_submodule("1")
        assert fin_norm.num_groups == res["report"].kept[g.id] and fin_norm.num_channels == 2 * fin_norm.num_groups


def test_timm_frozen_batchnorm_act_slices_its_buffers():
    timm = pytest.importorskip("timm")
    norm = timm.layers.FrozenBatchNormAct2d(8, act_layer="silu")
    model, x, gm, cg = analyzed(_norm_act_net(norm))
    g = group_of(cg, "_0")
    assert g.prunable, g.reason
    for seed in range(3):
        res = prune_and_check(model, x, gm, cg, seed=seed)
        fin_norm = res["fin"].get_submodule("1")
        assert fin_norm.weight.numel() == fin_norm.running_var.numel() == res["report"].kept[g.id] < 8


def test_timm_weight_standardized_conv_is_not_a_conv():
    """StdConv2d (a Conv2d subclass) standardizes each output row of its weight over its inputs:
    removing an input channel changes every row's statistics. It is traced into (F.batch_norm
    with no running statistics, training=True: values are computed that way too) and its
    computed weight makes it opaque, so what flows into it stays whole."""
    timm = pytest.importorskip("timm")
    std = timm.layers.StdConv2d(8, 8, 3, padding=1)
    assert REGISTRY.module_rule(std) is None
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), std, nn.ReLU(),
                        nn.Conv2d(8, 6, 1), nn.ReLU(), nn.Conv2d(6, 4, 1))
    model, x, gm, cg = analyzed(net)
    g = group_of(cg, "_0")
    assert not g.prunable and "weight is not a parameter" in g.reason
    assert group_of(cg, "_5").prunable
    for seed in range(3):
        prune_and_check(model, x, gm, cg, seed=seed)


class Odd(nn.Module):
    def forward(self, x):
        return x.cumsum(1)


def test_timm_norm_act_with_an_activation_without_a_rule_blocks_and_names_it():
    timm = pytest.importorskip("timm")
    norm = timm.layers.BatchNormAct2d(8, act_layer=Odd)
    _, _, gm, cg = analyzed(_norm_act_net(norm))
    g = group_of(cg, "_0")
    assert not g.prunable and "act (Odd)" in g.reason and "register_op" in g.reason
