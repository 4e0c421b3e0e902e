"""The method platform: hooks and their order, Decision, scores, resources, the import layering,
and the growing-regularization methods (greg1, greg2, tpp) on it."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import fxprune
from fxprune.data import digits_loaders
from fxprune.method import METHODS
from fxprune.models import build_model
from helpers import resumed_equals_uninterrupted, run_steps

ROOT = Path(__file__).resolve().parents[1]


# ---- a user-defined method, public names only (the README shows the same one) ---------------------
@dataclass(frozen=True)
class TraceOptions:
    keep_every: int = 2


class EveryOther(fxprune.Method):
    """Keeps every ``keep_every``-th unit of each prunable group and records each hook call."""

    name = "every-other"
    Options = TraceOptions

    def __init__(self, **options):
        super().__init__(**options)
        self.calls: list[str] = []

    def prepare(self, ctx):
        self.calls.append("prepare")

    def loss(self, ctx):
        self.calls.append("loss")
        return None

    def after_backward(self, ctx):
        self.calls.append("after_backward")

    def after_step(self, ctx):
        self.calls.append(f"after_step {ctx.step}")

    def decide(self, ctx, data=None):
        self.calls.append("decide")
        return fxprune.Decision({g.id: np.arange(g.size) % self.options.keep_every == 0
                                 for g in ctx.graph.prunable_groups})


def _digits():
    return digits_loaders(image_size=16, batch_size=32, seed=0)


def test_hooks_fire_in_order_in_compile():
    torch.manual_seed(0)
    data = _digits()
    m = EveryOther(keep_every=2)
    steps = len(data.train)
    result = fxprune.compile(build_model("resnet20"), m, fxprune.Budget(flops=1.0), data.example_inputs(),
                             train_loader=data.train, epochs=1, progress=False)
    per_step = ["loss", "after_backward"]
    expected = ["prepare"] + [c for s in range(1, steps + 1) for c in per_step + [f"after_step {s}"]] + ["decide"]
    assert m.calls == expected
    assert result.report.method == "every-other" and result.report.method_options == {"keep_every": 2}
    kept = {g["id"]: g["kept"] for g in result.report.groups if g["prunable"]}
    assert all(k == (size + 1) // 2 for k, size in zip(kept.values(), (g["size"] for g in result.report.groups if g["prunable"])))


def test_hooks_fire_in_order_in_a_hand_written_loop():
    torch.manual_seed(0)
    data = _digits()
    m = EveryOther()
    prepared = fxprune.prepare(build_model("resnet20"), m, fxprune.Budget(flops=1.0), data.example_inputs())
    run_steps(prepared, [b for _, b in zip(range(2), data.train)], torch.optim.SGD(prepared.model_parameters(), lr=0.01))
    pruned = fxprune.finalize(prepared)
    assert m.calls == ["prepare", "loss", "after_backward", "after_step 1", "loss", "after_backward",
                       "after_step 2", "decide"]
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in prepared.module.parameters())


class OwnStep(EveryOther):
    name = "own-step"

    def train_step(self, ctx, batch, optimizer):
        self.calls.append("train_step")
        x, y = batch
        optimizer.zero_grad()
        out = ctx.module(x)
        loss = nn.functional.cross_entropy(out, y)
        loss.backward()
        optimizer.step()
        return out, loss.detach()


def test_a_method_that_owns_the_step_replaces_it_in_compile():
    data = _digits()
    m = OwnStep()
    fxprune.compile(build_model("resnet20"), m, fxprune.Budget(flops=1.0), data.example_inputs(),
                    train_loader=data.train, epochs=1, progress=False)
    steps = len(data.train)
    assert m.calls == ["prepare"] + [c for s in range(1, steps + 1) for c in ("train_step", f"after_step {s}")] + ["decide"]


def test_unknown_options_and_methods_are_config_errors():
    with pytest.raises(fxprune.ConfigError, match="no option"):
        EveryOther(keep_evry=2)
    with pytest.raises(fxprune.ConfigError, match="greg1"):
        fxprune.get_method("greg3")
    assert {"l1", "gdp", "greg1", "greg2", "tpp"} <= set(METHODS)


def test_a_decision_that_does_not_fit_the_graph_is_refused():
    prepared = fxprune.prepare(build_model("resnet20"), "l1", fxprune.Budget(flops=0.5), (torch.randn(1, 3, 16, 16),))
    cg = prepared.channel_graph
    fixed = next(g for g in cg.groups if not g.prunable)
    with pytest.raises(fxprune.ConfigError, match="not prunable"):
        fxprune.Decision({fixed.id: np.zeros(fixed.size, bool)}).complete(cg)
    with pytest.raises(fxprune.ConfigError, match="does not have"):
        fxprune.Decision({10_000: np.zeros(3, bool)}).complete(cg)


# ---- scores and resources ------------------------------------------------------------------------------
def test_scores_are_per_unit_and_bn_scale_reads_gamma():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    with torch.no_grad():
        net[1].weight.copy_(torch.linspace(-1, 1, 8))
    gm = fxprune.trace(net, (torch.randn(2, 3, 8, 8),))
    cg = fxprune.analyze(gm)
    g = cg.prunable_groups[0]
    assert np.allclose(fxprune.scores.score("bn_scale", gm, cg, g), np.abs(np.linspace(-1, 1, 8)))
    assert np.allclose(fxprune.scores.score("l1", gm, cg, g), net[0].weight.detach().abs().sum((1, 2, 3)).numpy())
    fpgm = fxprune.scores.score("fpgm", gm, cg, g)
    w = net[0].weight.detach().reshape(8, -1).double()
    assert np.allclose(fpgm, torch.cdist(w, w).sum(1).numpy())
    assert fxprune.scores.score("random", gm, cg, g).shape == (8,)
    with pytest.raises(fxprune.ConfigError, match="needs data"):
        fxprune.scores.score("taylor", gm, cg, g)
    loader = [(torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,)))]
    taylor = fxprune.scores.score("taylor", gm, cg, g, loader)
    assert taylor.shape == (8,) and (taylor >= 0).all() and taylor.any()


def test_budgets_limit_named_resources():
    prepared = fxprune.prepare(build_model("resnet20"), "l1", fxprune.Budget(flops=0.5, params=0.6),
                               (torch.randn(1, 3, 16, 16),))
    t = prepared.targets
    assert set(t.limits) == {"macs", "params"} and t.macs == int(0.5 * t.dense_macs)
    with pytest.raises(fxprune.ConfigError, match="number"):
        fxprune.Budget(flops="0.5")
    with pytest.raises(fxprune.ConfigError):
        prepared.cost.resource("latency")


# ---- import layering ----------------------------------------------------------------------------------
CORE = ["ir", "files", "analysis", "cost", "budget", "errors", "decision", "method", "scores", "tracing", "train",
        "data", "models", "rules/base", "rules/producers", "rules/norms", "rules/pointwise",
        "rules/combine", "rules/movement", "rules/shapes", "rules/__init__", "__init__"]


def _imports(tree: ast.AST) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append(node.module)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return out


def test_core_modules_import_nothing_from_passes_backends_or_the_flow():
    upper = ("fxprune.passes", "fxprune.backends", "fxprune.flow")
    for name in CORE:
        tree = ast.parse((ROOT / "fxprune" / f"{name}.py").read_text())
        # fxprune/__init__ loads the flow lazily inside functions; its module body must not
        body = ast.Module([n for n in tree.body if not isinstance(n, ast.FunctionDef)], []) if name == "__init__" else tree
        bad = [m for m in _imports(body) if m.startswith(upper)]
        assert not bad, (name, bad)


def test_any_module_imports_first_in_a_fresh_interpreter():
    modules = ["fxprune.passes.methods.gdp", "fxprune.passes.methods.greg", "fxprune.passes.finalize",
               "fxprune.backends.onnx", "fxprune.flow.api", "fxprune.flow.cli", "fxprune.method",
               "fxprune.scores", "fxprune.rules.movement", "fxprune.analysis", "fxprune.budget"]
    script = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    for k in [k for k in sys.modules if k == 'fxprune' or k.startswith('fxprune.')]:\n"
        "        del sys.modules[k]\n"
        "    importlib.import_module(name)\n"
        "    from fxprune import Budget, Method, compile\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# ---- growing regularization ------------------------------------------------------------------------------
def _flops(model, x) -> int:
    with FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops()


@pytest.mark.parametrize("method", ["greg1", "greg2", "tpp"])
def test_regularization_methods_meet_the_budget_exactly_after_finalize(method):
    torch.manual_seed(0)
    data = _digits()
    model = build_model("resnet20")
    x = data.example_inputs()[0]
    result = fxprune.compile(model, method, fxprune.Budget(flops=0.5), (x,), train_loader=data.train,
                             epochs=2, progress=False)
    dense, pruned = _flops(model.eval(), x), _flops(result.model.eval(), x)
    assert pruned <= 0.5 * dense and pruned >= 0.45 * dense  # exactly on budget, not wastefully below
    assert result.report.equivalence["max_rel_diff"] < 1e-4
    assert result.report.epochs[-1]["extra"]["lam_max"] > 0


def _greg_prepared(method: str, **options):
    torch.manual_seed(0)
    return fxprune.prepare(build_model("resnet20"), method, fxprune.Budget(flops=0.5), (torch.randn(2, 3, 16, 16),),
                           total_steps=10, start=0.0, **options)


@pytest.mark.parametrize("method", ["greg1", "greg2", "tpp"])
def test_resume_mid_penalty_equals_an_uninterruptedrun_steps(method):
    data = _digits()
    batches = [b for _, b in zip(range(8), data.train)]

    def setup():
        p = _greg_prepared(method)
        return p, torch.optim.SGD(p.model_parameters(), lr=0.05, momentum=0.9)

    a, c = resumed_equals_uninterrupted(setup, batches, 4)
    assert all(torch.equal(a.method.lam[g], c.method.lam[g]) for g in a.method.lam)
    assert fxprune.finalize(a) is not None and a.finalize_report.max_rel_diff < 1e-4


def test_tpp_zeroes_pruned_filters_once_stabilize_has_given_every_layer_its_turn():
    prepared = _greg_prepared("tpp")  # 10 steps of 11,000 official iterations: the last one stabilizes
    data = _digits()
    batches = [b for _, b in zip(range(10), data.train)]
    run_steps(prepared, batches, torch.optim.SGD(prepared.model_parameters(), lr=0.01))
    m, ctx = prepared.method, prepared.ctx
    assert m.phase == "stabilize" and m.turns > max(r.layer for r in m.rows)
    for r in m.rows + m.extra_rows:
        pruned = torch.as_tensor(m.pruned[r.group])[r.units]
        w = ctx.module.get_parameter(r.qualname).detach().movedim(r.dim, 0)
        assert (w[pruned] == 0).all()


# ---- GDP: a block-internal group may die, a stream may not ---------------------------------------------
def test_bypassed_groups_are_block_internal_ones():
    gm = fxprune.trace(build_model("resnet20").eval(), (torch.randn(1, 3, 16, 16),))
    cg = fxprune.analyze(gm)
    from fxprune.analysis import bypassed_groups

    bypassed = bypassed_groups(gm, cg)
    for g in cg.prunable_groups:
        internal = all(space.endswith("conv1") for space in g.spaces)  # BasicBlock's first conv only
        assert (g.id in bypassed) == internal, (g.spaces, g.id in bypassed)


def test_gdp_removes_a_whole_block_and_its_cost_counts_it():
    torch.manual_seed(0)
    model = build_model("resnet20").eval()
    x = torch.randn(1, 3, 16, 16)
    prepared = fxprune.prepare(model, "gdp", fxprune.Budget(flops=0.95), (x,), total_steps=10)
    m, cg = prepared.method, prepared.channel_graph
    internal = next(gid for gid in sorted(m.bypassed))
    with torch.no_grad():
        m.zero_units(m.gates[internal], torch.ones(cg.group(internal).size, dtype=torch.bool))
    decision = m.decide(prepared.ctx)
    assert not decision.keep[internal].any()
    pruned = fxprune.finalize(prepared)
    assert prepared.finalize_report.removed_branches and prepared.finalize_report.kept[internal] == 0
    assert 2 * prepared.cost.macs(prepared.finalize_report.keep) == _flops(pruned.eval(), x)


# ---- the benchmark harness -----------------------------------------------------------------------------
def test_bench_writes_json_markdown_and_plot(tmp_path):
    from fxprune.flow.bench import BenchConfig, bench

    cfg = BenchConfig(methods=("l1", "gdp:warmup=0.5"), dataset="digits", flops=(0.5,), seeds=(0,), epochs=1,
                      finetune=0, out=str(tmp_path / "m"))
    runs = bench(cfg, progress=False)
    assert sorted(r["method"] for r in runs) == ["dense", "gdp:warmup=0.5", "l1"]
    assert all(r["macs_fraction"] <= 0.5 for r in runs if r["method"] != "dense")
    gdp = next(r for r in runs if r["method"].startswith("gdp"))
    assert gdp["method_options"]["warmup"] == 0.5 and set(gdp["seconds"]) >= {"prepare", "train", "finalize"}
    saved = json.loads((tmp_path / "m.json").read_text())
    assert len(saved["runs"]) == 3 and {r["method"] for r in saved["rows"]} == {"dense", "l1", "gdp:warmup=0.5"}
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG" and "| l1 | 50% |" in (tmp_path / "m.md").read_text()
    assert (tmp_path / "m_widths.png").read_bytes()[:4] == b"\x89PNG"  # kept width per group, per method
    assert bench(cfg, resume=True, progress=False) and json.loads((tmp_path / "m.json").read_text())["runs"] == saved["runs"]
