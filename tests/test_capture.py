"""Capture with concrete shapes: models that plain torch.fx rejects trace, analyze and finalize.

The models (tests/realworld_models.py) branch on shapes, unpack ``x.shape``, build Python lists
from ``chunk``, cache anchors keyed on ``x.shape`` and take ``*args``/``**kwargs``. Each test
first shows that ``torch.fx.symbolic_trace`` fails on the model (so passing proves something),
then runs the whole spine with random gates (``prune_and_check``) and a second input.
Value-dependent control flow must still give an opaque leaf (in a submodule) or a TraceError
(at the root).
"""
from __future__ import annotations

import operator
import warnings

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import fxprune
from fxprune.modcopy import copy_module
import realworld_models as rw
from test_spine_zoo import RTOL, assert_unchanged, calibrate, prune_and_check, rel_diff, state_snapshot

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build(cls: type[nn.Module], size: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = cls().eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    calibrate(model, x)
    return model, x


def assert_plain_fx_fails(model: nn.Module) -> None:
    with pytest.raises(fx.proxy.TraceError):  # symbolic proxies cannot steer control flow or iterate
        fx.symbolic_trace(model)


def spine(model: nn.Module, x: torch.Tensor, gm: fx.GraphModule | None = None) -> dict:
    """trace -> analyze -> gates -> finalize == gated; the finalized model on a second input."""
    if gm is None:
        gm = fxprune.trace(model, (x,))
        assert gm.meta["fxprune_leaf_modules"] == {}
    with torch.no_grad():
        assert rel_diff(gm(x), model(x)) <= 1e-6
    res = prune_and_check(model, x, gm)
    x2 = torch.randn_like(x)
    with torch.no_grad():
        assert rel_diff(res["fin"](x2), res["gated"](x2)) <= 10 * RTOL
    return res


# ---- the real-world constructs end to end -------------------------------------------------------------
def test_detector_with_varargs_chunk_lists_and_anchor_cache():
    model, x = build(rw.TinyDetector, 64)
    assert_plain_fx_fails(model)
    cached = model.head.shape  # filled by the calibration batch of 4
    gm = fxprune.trace(model, (x,))
    assert model.head.shape == cached  # the cache ran on the copy only
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]  # *args, **kwargs bound
    res = spine(model, x)
    # anchors are rebuilt from the input's shape at run time, as the model's cache would
    x3 = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        assert rel_diff(gm(x3), model(x3)) <= 1e-6
    assert any(g.prunable for g in res["cg"].groups if any("cv1" in s for s in g.spaces))


def test_attention_block_keeps_size_reads_as_nodes():
    model, x = build(rw.AttentionNet, 32)
    assert_plain_fx_fails(model)
    gm = fxprune.trace(model, (x,))
    views = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "view"]
    assert views and all(any(isinstance(a, fx.Node) for a in v.args[1:]) for v in views)
    shapes = [n for n in gm.graph.nodes if n.target is getattr and n.args[1] == "shape"]
    assert len(shapes) == 1 and all(u.target is operator.getitem for u in shapes[0].users)
    assert not any(n.target in (operator.mod, operator.ne) for n in gm.graph.nodes)  # the check is specialised
    x3 = torch.randn(2, 3, 48, 40)  # sizes are read at run time: another shape works
    with torch.no_grad():
        assert rel_diff(gm(x3), model(x3)) <= 1e-6
    res = spine(model, x)
    with torch.no_grad():
        assert rel_diff(res["fin"](x3), res["gated"](x3)) <= 10 * RTOL


def test_segmentation_with_divisibility_check_and_optional_skips():
    model, x = build(rw.TinyUNet, 64)
    assert_plain_fx_fails(model)
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 3, 48, 48))
    res = spine(model, x)
    assert sum(g.prunable for g in res["cg"].groups) >= 5


def test_keyword_only_options_and_split_sizes_from_size():
    model, x = build(rw.KeywordOnlyNet, 32)
    assert_plain_fx_fails(model)
    res = spine(model, x)
    assert [n.op for n in res["gm"].graph.nodes].count("placeholder") == 1


# ---- *args / **kwargs ---------------------------------------------------------------------------------
def test_extra_example_inputs_bind_to_varargs():
    model = rw.VarArgsSum().eval()
    x, r1, r2 = (torch.randn(1, 3, 8, 8) for _ in range(3))
    gm = fxprune.trace(model, (x, r1, r2))
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["x", "rest_0", "rest_1"]
    with torch.no_grad():
        assert torch.equal(gm(x, r1, r2), model(x, r1, r2))
    gm1 = fxprune.trace(model, (x,))
    assert [n.name for n in gm1.graph.nodes if n.op == "placeholder"] == ["x"]
    with torch.no_grad():
        assert torch.equal(gm1(x), model(x))


def test_non_tensor_example_inputs_are_specialised():
    class Scaled(nn.Module):
        def forward(self, x, factor, mode=None):
            return x * factor if mode is None else x

    x = torch.randn(1, 3, 4, 4)
    gm = fxprune.trace(Scaled(), (x, 3))
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["x", "factor"]
    assert torch.equal(gm(x, 3), x * 3) and torch.equal(gm(x), x * 3)  # the value is baked in


def test_wrong_number_of_example_inputs_raises_trace_error():
    with pytest.raises(fxprune.TraceError, match="example inputs"):
        fxprune.trace(rw.AttentionNet(), (torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)))

    class TwoInputs(nn.Module):
        def forward(self, x, y):
            return x + y

    with pytest.raises(fxprune.TraceError, match="'y'"):
        fxprune.trace(TwoInputs(), (torch.randn(1, 3, 8, 8),))


# ---- code that asks about types and turns sizes into data ----------------------------------------
class JitIsinstanceSkip(nn.Module):
    """A U-Net style skip: ``torch.jit.isinstance`` picks the concat; a proxy that answered
    False would take the other branch and fail later (the concat's consumer expects 2x the width)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.inner = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.up = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = self.down(x)
        z = self.inner(y)
        if torch.jit.isinstance(z, torch.Tensor) and torch.jit.isinstance([y, z], list[torch.Tensor]):
            z = torch.cat([y, z], 1)
        return self.up(z)


class SizesAsData(nn.Module):
    """Sizes turned into tensors and numpy arrays: spatial sizes must stay run-time reads, the
    channel count is the dense model's (finalize bakes it, as for any size of a pruned axis)."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.d = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.c(x)
        hw = torch.tensor(y.shape[-2:])
        scale = torch.as_tensor([y.shape[1], 2.0])
        channels = float(np.array(y.shape)[1])
        return self.d(y / hw.prod() * scale[0] / channels)


def test_jit_isinstance_sees_a_tensor_and_the_skip_concat_prunes():
    model, x = build(JitIsinstanceSkip, 16)
    gm = fxprune.trace(model, (x,))
    assert any(n.target is torch.cat for n in gm.graph.nodes)
    spine(model, x, gm)
    assert torch.jit.isinstance is fxprune.tracing._JIT_ISINSTANCE  # restored after the trace


def test_sizes_as_tensors_and_arrays_trace_and_read_spatial_sizes_at_run_time():
    model, x = build(SizesAsData, 16)
    gm = fxprune.trace(model, (x,))
    assert [n.target for n in gm.graph.nodes if n.target in (torch.tensor, torch.as_tensor)] == [torch.tensor,
                                                                                                torch.as_tensor]
    res = spine(model, x, gm)
    x2 = torch.randn(3, 3, 24, 20)  # another batch and resolution: hw is read from the input
    with torch.no_grad():
        assert rel_diff(gm(x2), model(x2)) <= 1e-6
        assert rel_diff(res["fin"](x2), res["gated"](x2)) <= 10 * RTOL
    assert torch.tensor is fxprune.tracing._TENSOR_FACTORIES["tensor"]


def test_numpy_of_tensor_values_makes_the_submodule_a_leaf():
    class ToNumpy(nn.Module):
        def forward(self, x):
            return x * float(np.array(x.mean()))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c, self.n, self.d = nn.Conv2d(3, 8, 3, padding=1), ToNumpy(), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.d(self.n(self.c(x)))

    model, x = build(Net, 8)
    gm = fxprune.trace(model, (x,))
    assert "numpy conversion" in gm.meta["fxprune_leaf_modules"]["n"]
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


class ListOfImages(nn.Module):
    """A detector's calling convention: a list of images in, a list of dicts out."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, images: list[torch.Tensor]):
        out = self.head(self.body(torch.stack(list(images))))
        return [{"scores": o.mean((1, 2))} for o in out]


def test_a_list_of_image_tensors_is_one_input_and_prunes():
    torch.manual_seed(0)
    model = ListOfImages().eval()
    images = [torch.randn(3, 12, 12), torch.randn(3, 12, 12)]
    gm = fxprune.trace(model, (images,))
    assert [n.op for n in gm.graph.nodes].count("placeholder") == 1
    res = prune_and_check(model, images, gm)
    with torch.no_grad():
        out = res["fin"](images)
    assert [list(d) for d in out] == [["scores"], ["scores"]]
    with pytest.raises(fxprune.ConfigError, match=r"example_inputs\[0\]\[1\]"):
        fxprune.trace(model, ([images[0], torch.full((3, 12, 12), float("nan"))],))


def test_a_whole_detector_is_refused_with_its_class_and_remedy():
    tv_detection = pytest.importorskip("torchvision.models.detection")
    model = tv_detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None).eval()
    with pytest.raises(fxprune.TraceError) as info:
        fxprune.trace(model, ([torch.rand(3, 64, 64)],))
    msg = str(info.value)
    assert "whole detector" in msg and "model.backbone" in msg and "NMS" in msg


class TokenNet(nn.Module):
    """A ViT's embedding: patch tokens, a class token expanded to the batch and concatenated, a
    position embedding added; a residual MLP; the head reads the class token."""

    def __init__(self, dim: int = 16, literal_expand: bool = False) -> None:
        super().__init__()
        self.patch, self.bn = nn.Conv2d(3, dim, 4, 4), nn.BatchNorm2d(dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 17, dim))
        self.fc1, self.fc2, self.head = nn.Linear(dim, 32), nn.Linear(32, dim), nn.Linear(dim, 10)
        self.literal_expand = literal_expand

    def forward(self, x):
        t = self.bn(self.patch(x)).flatten(2).transpose(1, 2)
        width = 16 if self.literal_expand else -1
        cls = self.cls_token.expand(t.shape[0], 1, width)
        t = torch.cat([cls, t], 1) + self.pos_embed
        t = t + self.fc2(torch.relu(self.fc1(t)))
        return self.head(t[:, 0])


@pytest.mark.parametrize("seed", [0, 1])
def test_class_token_and_position_embedding_are_sliced_and_gated_with_the_embedding(seed):
    model, x = build(TokenNet, 16)
    cg = fxprune.analyze(fxprune.trace(model, (x,)))
    stream = next(g for g in cg.groups if g.size == 16)
    assert stream.prunable, stream.reason
    gated_at = {s.node for s in stream.sites}
    assert {"cls_token", "pos_embed"} <= gated_at  # additive joins are gated, so removed channels are 0
    res = prune_and_check(model, x, seed=seed)
    kept = res["report"].kept[next(g.id for g in res["cg"].groups if g.size == 16)]
    assert res["fin"].cls_token.shape == (1, 1, kept) and res["fin"].pos_embed.shape == (1, 17, kept)
    x2 = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        assert rel_diff(res["fin"](x2), res["gated"](x2)) <= 10 * RTOL


def test_a_class_token_expanded_to_a_literal_width_blocks_the_embedding():
    model, x = build(lambda: TokenNet(literal_expand=True), 16)
    cg = fxprune.analyze(fxprune.trace(model, (x,)))
    stream = next(g for g in cg.groups if g.size == 16)
    assert not stream.prunable and "untracked tensor 'expand'" in stream.reason


# ---- value-dependent control flow --------------------------------------------------------------------
def test_value_dependent_submodules_become_leaves_with_reasons():
    model, x = build(rw.ShapeAndValueBranches, 16)
    assert_plain_fx_fails(model)
    gm = fxprune.trace(model, (x,))
    leaves = gm.meta["fxprune_leaf_modules"]
    assert sorted(leaves) == ["clamp", "squeeze"]
    assert "x.abs().max() > 10" in leaves["clamp"] and "bool()" in leaves["clamp"]
    assert ".item()" in leaves["squeeze"] and "int()" in leaves["squeeze"]
    top_level = [n.target for n in gm.graph.nodes if n.op == "call_module" and "." not in n.target]
    assert top_level == ["clamp", "squeeze", "head"]
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    cg = fxprune.analyze(gm)
    assert any(g.prunable for g in cg.groups if "c2_conv" in g.spaces)  # between the two leaves
    prune_and_check(model, x, gm, cg)


def test_value_dependent_root_raises_trace_error_naming_the_line():
    with pytest.raises(fxprune.TraceError) as info:
        fxprune.trace(rw.ItemAtRoot(), (torch.randn(1, 3, 8, 8),))
    msg = str(info.value)
    assert "ItemAtRoot" in msg and "root" in msg and "control flow" in msg
    assert "int(x.abs().mean().item() * 3)" in msg


# ---- what tracing must not change ------------------------------------------------------------------
class TrainOnlyShift(nn.Module):
    def forward(self, x):
        return x + 1 if self.training else x


class TrainModeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = rw.ConvBNAct(3, 8, 3)
        self.shift = TrainOnlyShift()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.shift(self.block(x)))


def test_train_mode_graph_without_moving_batchnorm_statistics():
    model = TrainModeNet().train()
    snapshot = state_snapshot(model)
    x = torch.randn(2, 3, 8, 8)
    gm = fxprune.trace(model, (x,))
    assert_unchanged(model, snapshot)
    assert torch.equal(gm.block.bn.running_mean, model.block.bn.running_mean)
    assert gm.training and any(n.target is operator.add for n in gm.graph.nodes)  # recorded as in train mode
    eval_gm = fxprune.trace(model.eval(), (x,))
    assert not any(n.target is operator.add for n in eval_gm.graph.nodes)


def test_values_are_recorded_on_every_node():
    model, x = build(rw.TinyDetector, 64)
    gm = fxprune.trace(model, (x,))
    for node in gm.graph.nodes:
        assert "fxprune_value" in node.meta, node.name
    out = next(n for n in gm.graph.nodes if n.op == "output")
    assert out.meta["fxprune_value"] == fxprune.tracing.TensorMeta((1, 7, 16 * 16 + 8 * 8), torch.float32)
    sizes = [n.meta["fxprune_value"] for n in gm.graph.nodes if n.target is getattr and n.args[1] == "shape"]
    assert sizes and all(isinstance(s, torch.Size) for s in sizes)


def test_traced_module_survives_save_and_load(tmp_path):
    model, x = build(rw.AttentionNet, 32)
    gm = fxprune.trace(model, (x,))
    torch.save(gm, tmp_path / "gm.pt")
    loaded = torch.load(tmp_path / "gm.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))


def test_lazy_modules_are_materialised_on_the_copy():
    model = nn.Sequential(nn.LazyConv2d(8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    x = torch.randn(1, 3, 8, 8)
    gm = fxprune.trace(model, (x,))
    assert gm.get_submodule("0").weight.shape == (8, 3, 3, 3)
    assert isinstance(model[0], nn.LazyConv2d)
    with torch.no_grad():
        assert gm(x).shape == (1, 4, 6, 6)


class SwallowsErrors(nn.Module):
    """A model's own ``except Exception`` must not hide value-dependent control flow."""

    def forward(self, x):
        try:
            if x.max() > 1:
                x = x / x.max()
        except Exception:
            pass
        return x


def test_model_try_except_cannot_swallow_value_dependent_control_flow():
    with pytest.raises(fxprune.TraceError, match="x.max\\(\\) > 1"):
        fxprune.trace(SwallowsErrors(), (torch.randn(1, 3, 4, 4),))


class OuterFailsLate(nn.Module):
    """Traces through an inner leaf, then fails itself: only the outer module stays a leaf."""

    def __init__(self):
        super().__init__()
        self.inner = rw.ClampIfLarge()
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.conv(self.inner(x))
        return y * 2 if y.mean() > 0 else y


def test_leaf_inside_a_failing_module_is_rolled_back():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), OuterFailsLate(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(1, 3, 8, 8)
    gm = fxprune.trace(model, (x,))
    assert list(gm.meta["fxprune_leaf_modules"]) == ["1"]
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1", "2"]
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


def test_head_with_list_cache_and_slice_assignment_stays_a_clean_leaf():
    model, x = build(rw.GridDetector, 32)
    model.detect.grid = [torch.empty(0), torch.empty(0)]  # stale: the traced forward refills it
    gm = fxprune.trace(model, (x,))
    leaves = gm.meta["fxprune_leaf_modules"]
    assert list(leaves) == ["detect"] and "item assignment" in leaves["detect"]
    assert [type(g) for g in gm.detect.grid] == [torch.Tensor, torch.Tensor]  # no proxy kept
    res = spine(model, x, gm)
    assert any(g.prunable for g in res["cg"].groups if "stem_conv" in g.spaces)


class TensorConstant(nn.Module):
    """A tensor made inside forward (not a parameter or buffer) becomes fx's ``_tensor_constant0``
    on the root; torchvision's maxvit_t does this."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        bias = torch.arange(4.0).view(1, 4, 1, 1)
        return self.head(torch.relu(y + bias))


def test_tensor_constants_made_in_forward_survive_tracing():
    model = TensorConstant().eval()
    x = torch.randn(1, 3, 8, 8)
    gm = fxprune.trace(model, (x,))
    assert any(n.op == "get_attr" for n in gm.graph.nodes)
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x))


class _Cached(nn.Module):
    """Tied weights, a module used twice, a cache dict and a plain tensor attribute."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 1)
        self.b = nn.Conv2d(3, 3, 1)
        self.b.weight = self.a.weight
        self.twice = nn.Sequential(self.a, nn.ReLU())
        self.cache: dict = {}
        self.scale = torch.tensor(2.0)

    def forward(self, x):
        self.cache.setdefault(tuple(x.shape), 1)
        return self.b(self.twice(x)) * self.scale


def test_trace_copies_the_model_as_deepcopy_would():
    """``trace`` copies with fxprune.modcopy (several times faster than deepcopy): the copy must
    be as independent as a deep copy, keep tied weights tied and modules shared where they were."""
    model = _Cached().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, 4, 4)
    expected = model(x)
    model.cache.clear()
    gm = fxprune.trace(model, (x,))
    assert model.cache == {}  # tracing ran the copy, not the model
    torch.testing.assert_close(gm(x), expected)
    with torch.no_grad():
        for p in gm.parameters():
            p.add_(1.0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k

    copied = copy_module(model)
    assert copied.b.weight is copied.a.weight and copied.a.weight is not model.a.weight
    assert copied.twice[0] is copied.a and copied.scale is not model.scale
    copied(x)
    assert copied.cache == {(1, 3, 4, 4): 1} and model.cache == {}
    object.__setattr__(model.a, "peer", model.b)  # a module kept as a plain attribute (not a child)
    again = copy_module(model)
    assert again.a.peer is again.b and again.b is not model.b


def test_traced_copy_shares_memory_until_either_side_writes():
    """The copy ``trace`` makes is copy-on-write (``modcopy.lazy_clone``): no tensor is copied
    up front, yet training the gated module (optimizer steps, BatchNorm statistics) never reaches
    the user's model, and the user's later writes never reach the traced one."""
    from fxprune.modcopy import lazy_clone
    from fxprune.passes import insert_gates

    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    gm = fxprune.trace(model, (x,))
    if hasattr(torch._C, "_is_cow_tensor"):
        assert all(torch._C._is_cow_tensor(p) for p in gm.parameters())
    gated, _ = insert_gates(gm, fxprune.analyze(gm))
    gated.train()
    opt = torch.optim.SGD(gated.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        gated(x).square().mean().backward()
        opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    traced = {k: v.clone() for k, v in gm.state_dict().items()}
    with torch.no_grad():
        model.conv1.weight.mul_(2.0)
        model.bn1.running_mean.add_(1.0)
    for k, v in gm.state_dict().items():
        assert torch.equal(v, traced[k]), k
    shared = torch.from_numpy(np.ones(3, dtype=np.float32))  # memory torch cannot share lazily: a real copy
    copy = lazy_clone(shared)
    copy.add_(1.0)
    assert torch.equal(shared, torch.ones(3)) and torch.equal(copy, torch.full((3,), 2.0))


def test_handed_out_modules_run_their_hooks_once_per_call():
    """Passes build lazy working copies; what they hand out must not call itself twice on its
    first run (a lazy GraphModule writes its code, then re-enters ``__call__``). Finalize's
    check runs the gated graph node by node, never through the root's ``__call__``, so hooks a
    user put on the gated root neither fire nor alter the reference it compares against."""
    from fxprune.passes import finalize, insert_gates

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    x = torch.randn(1, 3, 8, 8)
    gm = fxprune.trace(model, (x,))
    gated, _ = insert_gates(gm, fxprune.analyze(gm))
    calls: list[str] = []
    for name, m in (("traced", gm), ("gated", gated)):
        m.register_forward_pre_hook(lambda mod, args, name=name: calls.append(name))
    gm(x)
    gated(x)
    fin = finalize(gated, fxprune.analyze(gm))
    fin.register_forward_pre_hook(lambda mod, args: calls.append("finalized"))
    fin(x)
    assert calls == ["traced", "gated", "finalized"]


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


class _Adversarial(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(_GradReverse.apply(torch.relu(self.bn(self.conv(x))))).mean((2, 3))


def test_custom_autograd_function_stays_opaque_and_keeps_its_backward():
    """Tracing through ``Function.forward`` silently dropped the custom backward (the gated model's
    input gradient was the negation of the user's); the Function is now one opaque node."""
    model = _Adversarial().eval()
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    model(x).sum().backward()
    expected, x.grad = x.grad.clone(), None
    gm = fxprune.trace(model, (x.detach(),))
    assert any(n.op == "call_function" and n.target.__name__ == "_GradReverse_apply" for n in gm.graph.nodes)
    gm(x).sum().backward()
    torch.testing.assert_close(x.grad, expected)
    blocked = [g.reason for g in fxprune.analyze(gm).groups if not g.prunable]
    assert any("_GradReverse_apply" in r for r in blocked)
    assert "_FunctionBase" in repr(torch.autograd.Function.__dict__["apply"])  # the patch is undone


def test_register_op_teaches_a_custom_autograd_function():
    """``register_op(Function, rule)``: the channels through it become prunable, finalize is exact,
    and the pruned model still runs the Function's own backward."""
    from fxprune.passes import finalize, insert_gates
    from fxprune.rules.base import REGISTRY, function_target

    fxprune.register_op(_GradReverse, fxprune.rules.elementwise("gradient reversal"))
    try:
        model = _Adversarial().eval()
        x = torch.randn(2, 3, 8, 8)
        gm = fxprune.trace(model, (x,))
        cg = fxprune.analyze(gm)
        assert cg.groups[0].prunable
        gated, gates = insert_gates(gm, cg)
        with torch.no_grad():
            gates[0].weight[:4] = 0.0
        pruned = finalize(gated, cg)
        assert pruned.get_submodule("head").in_channels == 4
        xs = x.clone().requires_grad_(True)
        pruned(xs).sum().backward()
        with torch.no_grad():
            reference = gated(x)
        torch.testing.assert_close(pruned(x), reference)
        g_pruned = xs.grad.clone()
        xs.grad = None
        gated(xs).sum().backward()
        torch.testing.assert_close(g_pruned, xs.grad)  # the reversal survives finalize
    finally:
        del REGISTRY.functions[function_target(_GradReverse)]


# ---- shape-only convolutions and linears -------------------------------------------------------

class _CountConvs:
    """Counts conv2d calls on real (non-meta) tensors while tracing."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        import torch.nn.modules.conv as conv_module
        real = conv_module.F.conv2d
        self.calls = 0

        def counted(x, *args, **kwargs):
            self.calls += x.device.type != "meta"
            return real(x, *args, **kwargs)

        monkeypatch.setattr(conv_module.F, "conv2d", counted)


class _PositivesOnly(nn.Module):
    """A conv's output values decide an output's shape (a boolean mask): zeros would give none."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        flat = y.flatten()
        return self.head(torch.relu(y)), flat[flat > 0]


class _RunningMean(nn.Module):
    """Writes a conv's output into a buffer in place while it runs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.register_buffer("seen", torch.zeros(4))

    def forward(self, x):
        y = self.conv(x)
        self.seen.add_(y.mean((0, 2, 3)))
        return y


def test_plain_convnets_trace_without_computing_their_convolutions(monkeypatch):
    """The trace needs the convs' output shapes only: torchvision resnet18 traces without one
    real conv2d, nor a real BatchNorm or max-pool on what the convs yield, and the traced module
    (which does compute) equals the model."""
    import torchvision
    import torch.nn.modules.batchnorm as bn_module
    import torch.nn.modules.pooling as pool_module

    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    counter = _CountConvs(monkeypatch)
    real: list[str] = []
    for module, name in ((bn_module.F, "batch_norm"), (pool_module.F, "max_pool2d")):
        def counted(t, *args, _op=getattr(module, name), _name=name, **kwargs):
            if t.device.type != "meta":
                real.append(_name)
            return _op(t, *args, **kwargs)
        monkeypatch.setattr(module, name, counted)
    gm = fxprune.trace(model, (x,))
    assert counter.calls == 0 and real == []
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), rtol=1e-5, atol=1e-6)
    assert counter.calls > 0 and "batch_norm" in real and "max_pool2d" in real


def _layouts() -> list[tuple[nn.Module, torch.Tensor]]:
    """Layers and inputs whose output layout the shape-only trace must get right: row-major and
    channels-last inputs and weights, size-1 dims whose strides are arbitrary, 1-3 spatial dims."""
    torch.manual_seed(0)
    x4, x5 = torch.randn(2, 8, 9, 7), torch.randn(1, 8, 5, 6, 7)
    odd = torch.randn(3, 8, 1).transpose(1, 2).transpose(1, 2)  # "contiguous", stride 8 on a size-1 dim
    cases: list[tuple[nn.Module, torch.Tensor]] = []
    for conv in (nn.Conv2d(8, 6, 3, 2, 1), nn.Conv2d(8, 8, 3, 1, 2, dilation=2, groups=4),
                 nn.Conv2d(8, 4, (1, 3), (2, 1), (0, 1)), nn.Conv2d(8, 4, 3, padding="same"),
                 nn.Conv2d(8, 4, 3, padding=1, padding_mode="reflect")):
        cases += [(conv, x4), (conv, x4.contiguous(memory_format=torch.channels_last)), (conv, x4[:, :, ::2])]
    cases += [(nn.Conv2d(8, 6, 1).to(memory_format=torch.channels_last), x4), (nn.Conv2d(8, 6, 1), x4[:, :, :1, :1]),
              (nn.Conv1d(8, 5, 3, 2, 1), x4[0, :, :, 0]), (nn.Conv1d(8, 5, 3), torch.randn(8, 11)), (nn.Conv1d(8, 5, 1), odd), (nn.Conv3d(8, 4, 3, 1, 1), x5),
              (nn.Conv3d(8, 4, 3, 1, 1), x5.contiguous(memory_format=torch.channels_last_3d)),
              (nn.Linear(7, 5), x4), (nn.Linear(9, 5), x4.transpose(2, 3)), (nn.Linear(8, 3), torch.randn(8))]
    for layer in (nn.BatchNorm2d(8), nn.ReLU(), nn.SiLU(), nn.Hardswish(), nn.MaxPool2d(3, 2, 1),
                  nn.MaxPool2d(2, ceil_mode=True), nn.AvgPool2d(3, 2, 1, count_include_pad=False),
                  nn.AdaptiveAvgPool2d(1), nn.AdaptiveAvgPool2d((3, None))):
        cases += [(layer, x4), (layer, x4.contiguous(memory_format=torch.channels_last)), (layer, x4[:, :, 1:])]
    cases += [(nn.AdaptiveAvgPool1d(2), odd), (nn.AdaptiveAvgPool3d((1, 2, None)), x5), (nn.BatchNorm1d(8), odd)]
    return cases


@pytest.mark.parametrize("case", range(len(_layouts())))
def test_shape_only_values_have_the_real_output_layout(case):
    """Where the trace does not run a layer (a conv or linear; a norm, activation or pool given a
    value that is only right in shape) its stand-in has the real output's shape, strides and
    dtype, or the layer runs for real; row-major inputs always take the shortcut."""
    from fxprune.tracing import _row_major, _shape_only_output

    layer, x = _layouts()[case]
    layer.eval()
    stand_in = _shape_only_output(layer, (x,), {}, True)
    with torch.no_grad():
        real = layer(x)
    if stand_in is None:
        assert not (_row_major(x) and _row_major(getattr(layer, "weight", x))) or isinstance(layer.padding, str)
    else:
        assert (stand_in.shape, stand_in.stride(), stand_in.dtype) == (real.shape, real.stride(), real.dtype)


def test_a_layer_that_does_not_fit_its_input_runs_for_real():
    """No stand-in for a call that fails for real: the real run then raises the real error."""
    from fxprune.tracing import _shape_only_output

    x = torch.randn(1, 7, 4, 4)
    for layer in (nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3), nn.Linear(8, 2), nn.Conv2d(7, 4, 5)):
        assert _shape_only_output(layer, (x,), {}, True) is None
        with pytest.raises(RuntimeError):
            layer(x)
    assert _shape_only_output(nn.MaxPool2d(2, return_indices=True), (x,), {}, True) is None  # indices are data


def test_a_shape_read_from_conv_values_is_traced_from_real_values(monkeypatch):
    """A boolean mask of a conv's output sizes a tensor: the shape-only trace gives way to one
    that computes every value, so the recorded shape is the real one."""
    model, x = _PositivesOnly().eval(), torch.randn(1, 3, 8, 8)
    counter = _CountConvs(monkeypatch)
    gm = fxprune.trace(model, (x,))
    assert counter.calls > 0
    with torch.no_grad():
        expected = model(x)[1]
    out_meta = [n for n in gm.graph.nodes if n.op == "output"][0].meta["fxprune_value"]
    assert 0 < expected.numel() < 4 * 8 * 8
    assert out_meta[1].shape == tuple(expected.shape)
    with torch.no_grad():
        assert torch.equal(gm(x)[1], expected)


def test_a_conv_output_written_into_a_buffer_is_written_with_real_values():
    """The traced copy ran the model once, as with every value computed: its buffer holds the
    real mean, not one of zeros; the user's buffer is untouched."""
    torch.manual_seed(0)
    model, x = _RunningMean().eval(), torch.randn(1, 3, 8, 8)
    gm = fxprune.trace(model, (x,))
    reference = copy_module(model)
    with torch.no_grad():
        reference(x)
    assert reference.seen.abs().sum() > 0
    assert torch.equal(gm.get_buffer("seen"), reference.seen)
    assert not model.seen.any()


class _WarnsThenMasks(_PositivesOnly):
    """Warns on every run and needs real values (its shape-only trace is abandoned)."""

    def forward(self, x):
        warnings.warn("fxprune-test: forward ran", UserWarning)
        return super().forward(x)


class _WarnsPlain(nn.Module):
    """Warns on every run and traces shape-only."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        warnings.warn("fxprune-test: forward ran", UserWarning)
        return self.conv(x)


@pytest.mark.parametrize("cls", [_WarnsThenMasks, _WarnsPlain])
def test_warnings_of_an_abandoned_shape_only_trace_are_not_repeated(cls):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fxprune.trace(cls().eval(), (torch.randn(1, 3, 8, 8),))
    assert [str(w.message) for w in caught if "fxprune-test" in str(w.message)] == ["fxprune-test: forward ran"]
