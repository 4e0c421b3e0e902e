"""LOP (fxprune.passes.lop): expanded layers compute what the compact ones do, train as two factors,
and collapse back, exactly, into the compact shapes; the user's model is never touched."""
from __future__ import annotations

import math

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock

import fxprune
from fxprune.errors import ConfigError, FxpruneWarning
from fxprune.passes.lop import ExpandedConv2d, ExpandedLinear, collapse, expand

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_net() -> nn.Module:
    """A small residual CNN with what LOP meets in practice: BN, stride, 1x1 downsample, dilation,
    reflect padding, biases on and off, a depthwise conv (left compact) and a linear head."""
    torch.manual_seed(0)
    down = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        BasicBlock(16, 16), BasicBlock(16, 32, stride=2, downsample=down),
        nn.Conv2d(32, 32, 3, padding=2, dilation=2, groups=32, bias=False),
        nn.Conv2d(32, 24, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10))
    for m in net.modules():  # non-trivial BN statistics, so eval mode is not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return net.eval()


def inputs(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal up to float rounding, relative to the output's scale."""
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rel * scale, f"max |diff| {err:.3g} > {rel:g} x {scale:.3g}"


def shapes(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def layer_types(model: nn.Module) -> dict[str, type]:
    """Submodule types by name (not the root's: a GraphModule's copy gets a class of its own)."""
    return {name: type(m) for name, m in model.named_modules() if name}


def products(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (ExpandedConv2d, ExpandedLinear))]


def sgd_steps(model: nn.Module, steps: int, lr: float = 0.05) -> nn.Module:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(2)
    for _ in range(steps):
        x = torch.randn(8, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (8,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


# 1. same function after expansion; collapse(expand(m)) is m ------------------------------------------

def test_expand_computes_the_same_function():
    net = small_net()
    big = expand(net, seed=0)
    with torch.no_grad():
        assert_close(big(inputs()), net(inputs()))
    expanded = dict(products(big))
    compact = {n: m for n, m in net.named_modules() if type(m) in (nn.Conv2d, nn.Linear)}
    assert set(expanded) == {n for n, m in compact.items() if getattr(m, "groups", 1) == 1}
    assert type(big[5]) is nn.Conv2d and big[5].groups == 32  # depthwise: left compact
    for name, layer in expanded.items():
        src = compact[name]
        c_in, c_out = (src.in_channels, src.out_channels) if isinstance(src, nn.Conv2d) else \
            (src.in_features, src.out_features)
        hidden = layer.first.out_channels if isinstance(layer, ExpandedConv2d) else layer.first.out_features
        assert hidden == 2 * max(c_in, c_out)
        assert layer.first.bias is None and (layer.last.bias is None) == (src.bias is None)
    assert big[6].first.padding_mode == "reflect" and big[4].conv1.first.stride == (2, 2)
    assert sum(p.numel() for p in big.parameters()) > 2 * sum(p.numel() for p in net.parameters())


def test_collapse_of_expand_is_the_compact_model():
    net = small_net()
    back = collapse(expand(net, seed=0))
    assert shapes(back) == shapes(net)
    assert layer_types(back) == layer_types(net)
    for name, m in back.named_modules():
        if isinstance(m, nn.Conv2d):
            ref = net.get_submodule(name)
            assert (m.stride, m.padding, m.dilation, m.groups, m.padding_mode) == \
                (ref.stride, ref.padding, ref.dilation, ref.groups, ref.padding_mode)
    with torch.no_grad():
        assert_close(back(inputs()), net(inputs()))
        for (k, v), (k2, v2) in zip(back.state_dict().items(), net.state_dict().items()):
            assert k == k2 and torch.allclose(v.float(), v2.float(), rtol=1e-5, atol=1e-6), k


@pytest.mark.parametrize("width", [1, 1.5, 3])
def test_exact_at_every_width_and_for_rank_deficient_weights(width):
    """width=1 leaves no room beyond W's rows (M = C_out < C_in k k); zeroed filters (what a
    pruned-but-not-removed layer has) make W rank-deficient; both stay exact."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 40, 1), nn.Flatten(),
                        nn.Linear(40 * 25, 7)).eval()
    with torch.no_grad():
        net[0].weight[:5] = 0.0
    big = expand(net, width=width, seed=1)
    assert big[0].first.out_channels == math.ceil(width * 16)
    x = torch.randn(2, 16, 5, 5)
    with torch.no_grad():
        assert_close(big(x), net(x))
        assert_close(collapse(big)(x), net(x))


# 2. collapse stays exact after training -----------------------------------------------------------

def test_collapse_is_exact_after_training():
    big = sgd_steps(expand(small_net(), seed=0), steps=3)
    small = collapse(big)
    assert shapes(small) == shapes(small_net())
    with torch.no_grad():
        out = big(inputs())
        assert_close(small(inputs()), out, rel=1e-5)
    assert not any(isinstance(m, (ExpandedConv2d, ExpandedLinear)) for m in small.modules())


# 3. the expanded model trains as factors, and differently from the compact one ---------------------

def test_every_factor_gets_gradient():
    big = expand(small_net(), seed=0).train()
    F.cross_entropy(big(inputs(8)), torch.arange(8) % 10).backward()
    found = products(big)
    assert len(found) == 8  # 7 ungrouped convs and the linear head
    for name, layer in found:
        for factor in ("first", "last"):
            grad = getattr(layer, factor).weight.grad
            assert grad is not None and grad.abs().max() > 0, f"{name}.{factor}: no gradient"
        # no dead hidden unit: every row of W1 and every column of W2 is moved
        g1 = layer.first.weight.grad.flatten(1).abs().sum(1)
        g2 = layer.last.weight.grad.flatten(1).abs().sum(0)
        assert bool((g1 > 0).all()) and bool((g2 > 0).all()), name


def test_expanded_model_trains_differently_from_the_compact_one():
    """One identical SGD step: the factors' update, multiplied out, is not the compact layer's
    (dW = W2 W2^T G + G W1^T W1 to first order, not G), so LOP is more than a re-labelling."""
    start = small_net()
    compact = sgd_steps(small_net(), steps=1)
    expanded = collapse(sgd_steps(expand(small_net(), seed=0), steps=1))
    for name, _ in products(expand(small_net(), seed=0)):
        new, old, init = (m.get_submodule(name).weight for m in (expanded, compact, start))
        assert (new - old).norm() > 0.1 * (old - init).norm(), name
    with torch.no_grad():
        moved = (compact(inputs()) - start(inputs())).abs().max().item()
        apart = (expanded(inputs()) - compact(inputs())).abs().max().item()
    assert moved > 0 and apart > 0.01 * moved


# 4. fx GraphModules --------------------------------------------------------------------------------

def test_graph_module_round_trip():
    net = small_net()
    gm = fxprune.trace(net, (torch.randn(2, 3, 32, 32),))
    big = expand(gm, seed=0)
    assert isinstance(big, fx.GraphModule) and isinstance(big.get_submodule("0"), ExpandedConv2d)
    assert len(products(big)) == 8
    with torch.no_grad():
        ref = gm(inputs())
        assert_close(big(inputs()), ref)
    big = sgd_steps(big, steps=1)
    small = collapse(big)
    assert isinstance(small, fx.GraphModule)
    assert shapes(small) == shapes(gm) and layer_types(small) == layer_types(gm)
    small.recompile()
    with torch.no_grad():
        assert_close(small(inputs()), big(inputs()))
    with torch.no_grad():  # the traced module itself was left alone
        assert_close(gm(inputs()), ref, rel=0)


def test_graph_module_layer_read_by_get_attr_is_left_compact():
    class ReadsWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.head = nn.Conv2d(4, 4, 1)

        def forward(self, x):  # calls the conv and reads its weight: a factor pair has no .weight
            return self.head(self.conv(x)) + self.conv.weight.mean()

    gm = fx.symbolic_trace(ReadsWeight().eval())
    with pytest.warns(FxpruneWarning, match="reads its parameters"):
        big = expand(gm, seed=0)
    assert type(big.conv) is nn.Conv2d and isinstance(big.head, ExpandedConv2d)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert_close(big(x), gm(x))
    with pytest.raises(ConfigError, match="reads its parameters"):
        expand(gm, names=["conv"])


# 5. the user's model is not modified ----------------------------------------------------------------

def test_user_model_is_not_modified():
    net = small_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    types = layer_types(net)
    big = sgd_steps(expand(net, seed=0), steps=1)
    small = collapse(big)
    sgd_steps(small, steps=1)
    assert layer_types(net) == types and not net.training
    after = net.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not any(isinstance(m, (ExpandedConv2d, ExpandedLinear)) for m in net.modules())
    assert products(big)  # and collapse left its input expanded
    assert not any(p.data_ptr() in {q.data_ptr() for q in net.parameters()} for p in small.parameters())


# 6. bad options ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(width=0.5), "below 1"),
    (dict(width=0), "below 1"),
    (dict(width=-2), "below 1"),
    (dict(width=float("nan")), "finite number"),
    (dict(width=float("inf")), "finite number"),
    (dict(width="2"), "finite number"),
    (dict(width=True), "finite number"),
    (dict(width=None), "finite number"),
    (dict(convs="yes"), "convs must be True or False"),
    (dict(linears=1), "linears must be True or False"),
    (dict(seed=1.5), "seed must be an int"),
    (dict(names=["nope"]), "no module of that name"),
    (dict(names=["5"]), "grouped conv"),
    (dict(names=["1"]), "BatchNorm2d"),
    (dict(names=[3]), "names must be strings"),
    (dict(names=5), "qualified module names"),
])
def test_bad_options_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        expand(small_net(), **kwargs)


def test_bad_models_and_factors_raise_config_error():
    with pytest.raises(ConfigError, match="expects an nn.Module"):
        expand(None)
    with pytest.raises(ConfigError, match="pass an instance"):
        expand(nn.Sequential)
    with pytest.raises(ConfigError, match="expects an nn.Module"):
        collapse({"weight": torch.zeros(1)})
    big = expand(small_net(), seed=0)
    with pytest.raises(ConfigError, match="inside the expanded layer '0'"):
        expand(big, names=["0.first"])
    with pytest.raises(ConfigError, match="1x1 conv"):
        ExpandedConv2d(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3))
    with pytest.raises(ConfigError, match="make them equal"):
        ExpandedLinear(nn.Linear(3, 8), nn.Linear(9, 4))


# what else expand keeps --------------------------------------------------------------------------

def test_selection_seed_and_idempotence():
    net = small_net()
    only_convs = expand(net, linears=False, seed=0)
    assert type(only_convs[10]) is nn.Linear and isinstance(only_convs[0], ExpandedConv2d)
    only_linear = expand(net, convs=False, seed=0)
    assert [n for n, _ in products(only_linear)] == ["10"]
    picked = expand(net, names="3.conv2", seed=0)
    assert [n for n, _ in products(picked)] == ["3.conv2"]
    a, b, c = expand(net, seed=7), expand(net, seed=7), expand(net, seed=8)
    assert torch.equal(a[0].first.weight, b[0].first.weight)
    assert not torch.equal(a[0].first.weight, c[0].first.weight)
    again = expand(a, seed=0)  # already expanded layers are left as they are
    assert [n for n, _ in products(again)] == [n for n, _ in products(a)]
    assert torch.equal(again[0].first.weight, a[0].first.weight)


def test_dtype_device_mode_and_requires_grad_are_kept():
    net = small_net().double().train()
    net[0].weight.requires_grad_(False)
    big = expand(net, seed=0)
    assert big.training and big[0].training and big[0].first.training
    assert all(p.dtype == torch.float64 for p in big.parameters())
    assert not big[0].first.weight.requires_grad and not big[0].last.weight.requires_grad
    assert big[6].first.weight.requires_grad and big[6].last.bias.requires_grad
    small = collapse(big)
    assert small.training and small[0].weight.dtype == torch.float64
    assert not small[0].weight.requires_grad and small[6].weight.requires_grad
    x = inputs().double()
    with torch.no_grad():
        assert_close(small.eval()(x), net.eval()(x), rel=1e-12)


def test_shared_modules_stay_shared_and_a_bare_layer_works():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    net = nn.Sequential(conv, nn.ReLU(), conv).eval()
    big = expand(net, seed=0)
    assert isinstance(big[0], ExpandedConv2d) and big[0] is big[2]
    small = collapse(big)
    assert small[0] is small[2] and type(small[0]) is nn.Conv2d
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        assert_close(big(x), net(x))
    layer = nn.Linear(5, 3)
    grown = expand(layer, seed=0)
    assert isinstance(grown, ExpandedLinear) and grown.first.out_features == 10
    assert type(collapse(grown)) is nn.Linear
    with torch.no_grad():
        assert_close(collapse(grown)(torch.ones(2, 5)), layer(torch.ones(2, 5)))


def test_layers_it_must_not_replace_are_left_alone():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)  # reads out_proj.weight itself
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)
            self.b.weight = self.a.weight  # tied
            self.hooked = nn.Linear(8, 8)
            self.hooked.register_forward_hook(lambda m, i, o: o * 2)

        def forward(self, x):
            return self.hooked(self.b(self.a(self.attn(x, x, x)[0])))

    net = Net().eval()
    with pytest.warns(FxpruneWarning) as record:
        big = expand(net, seed=0)
    text = " ".join(str(w.message) for w in record)
    assert "shares a parameter" in text and "hooks" in text
    assert [n for n, _ in products(big)] == []
    assert type(big.attn.out_proj) is type(net.attn.out_proj)
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        assert_close(big(x), net(x))


def test_public_functions_say_what_they_raise():
    for fn in (expand, collapse, ExpandedConv2d.collapse, ExpandedLinear.collapse,
               ExpandedConv2d.__init__, ExpandedLinear.__init__):
        assert "Raises" in (fn.__doc__ or ""), fn.__qualname__
