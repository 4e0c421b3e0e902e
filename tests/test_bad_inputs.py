"""The catalogue of bad inputs (issue 14): plausible mistakes and unusual models, each of which
must end in a named fxprune error whose message says what is wrong and what to do, with the
user's model and files exactly as they were. Cases that deserve a result rather than an error
(a DataParallel wrapper, hooks, parametrized layers) get a warning *and* a correct result.

Every case runs under a timeout (``pytest-timeout``): a bad input must never hang a run.
Each table row is ``(id, error class, build)``: ``build(env)`` returns the call to make and the
phrases its message must contain (the problem first, the remedy after).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import fxprune
from fxprune.backends import compare_latency, measure_latency
from fxprune.errors import (
    AnalysisError, BackendUnavailable, BudgetError, ConfigError, ExportError, FxpruneWarning, TraceError,
)
from fxprune.flow.cli import main as cli

pytestmark = pytest.mark.timeout(120)

X = (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)),)
HALF = fxprune.Budget(flops=0.5)


def net(classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes),
    )


class Pair(Dataset):
    """A dataset whose items are what ``item(i)`` returns (dicts, triples, lists...)."""

    def __init__(self, n: int, item: Callable[[int], Any]):
        self.n, self.item = n, item

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        return self.item(i)


def loader(n: int = 16, shape=(3, 8, 8), labels: torch.Tensor | None = None, batch: int = 8, **kw) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    y = labels if labels is not None else torch.randint(0, 4, (n,), generator=g)
    return DataLoader(TensorDataset(torch.randn(n, *shape, generator=g), y), batch_size=batch, **kw)


class TupleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = net()

    def forward(self, x):
        y = self.body(x)
        return y, y.softmax(1)


class DictNet(TupleNet):
    def forward(self, x):
        return {"logits": self.body(x)}


class BN1dNet(nn.Module):
    """BatchNorm1d after global pooling: a batch of one has one value per channel."""

    def __init__(self):
        super().__init__()
        self.body = net()[:-1]
        self.bn = nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.bn(self.body(x)))


class ValueBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = net()

    def forward(self, x):
        if x.mean() > 0:  # control flow on a tensor value at the root
            return self.body(x)
        return self.body(-x)


class RandomOut(nn.Module):
    """Output drawn at random: no export of it can match PyTorch, so validation must fail."""

    def __init__(self):
        super().__init__()
        self.body = net()

    def forward(self, x):
        return self.body(x) + torch.rand(x.shape[0], 4)


class NoDecide(fxprune.Method):
    name = "catalogue-no-decide"


class KeepAll(fxprune.Method):
    """A (broken) custom method whose decision ignores the budget."""

    name = "catalogue-keep-all"

    def decide(self, ctx, data=None):
        return fxprune.Decision({g.id: np.ones(g.size, dtype=bool) for g in ctx.graph.prunable_groups})


# ---- what "untouched" means -------------------------------------------------------------------------
def model_state(model: Any) -> Any:
    if not isinstance(model, nn.Module):
        return None
    return ({k: v.detach().clone() if not v.is_meta else v.shape for k, v in model.state_dict().items()}, model.training,
            [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()], repr(model))


def same_model(model: Any, before: Any) -> None:
    if before is None:
        return
    state, training, hooks, text = before
    after = model.state_dict()
    assert list(after) == list(state)
    for k, v in state.items():
        if after[k].is_meta:
            assert after[k].shape == v, k
            continue
        assert torch.equal(after[k], v) or (torch.isnan(v).any() and torch.equal(after[k].isnan(), v.isnan())), k
    assert (model.training, [(n, len(m._forward_hooks), len(m._forward_pre_hooks))
                             for n, m in model.named_modules()], repr(model)) == (training, hooks, text)


def files_state(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too: a leftover temporary file is a failure)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@dataclass
class Env:
    tmp: Path
    model: nn.Module


# ---- the catalogue ---------------------------------------------------------------------------------
def _nan_weight(e: Env):
    with torch.no_grad():
        e.model[3].weight[0, 0, 0, 0] = math.nan
    return lambda: fxprune.compile(e.model, "l1", HALF, X, progress=False), ("3.weight", "NaN/Inf", "reload the weights")


def _inf_buffer(e: Env):
    e.model[1].running_var[2] = math.inf
    return lambda: fxprune.compile(e.model, "l1", HALF, X, progress=False), ("1.running_var", "NaN/Inf", "reload")


def _old_norm(kind: str):
    def build(e: Env):
        getattr(torch.nn.utils, kind)(e.model[0])
        return lambda: fxprune.compile(e.model, "l1", HALF, X, progress=False), (kind, f"remove_{kind}")
    return build


def _meta_model(e: Env):
    e.model = net().to("meta")
    return lambda: fxprune.compile(e.model, "l1", HALF, (X[0].to("meta"),), progress=False), ("meta device", "to_empty")


def _result(e: Env):
    result = fxprune.compile(e.model, "l1", HALF, X, progress=False)
    return result


def _decision_of(e: Env, keep: Callable[[fxprune.ChannelGraph], dict]):
    gm = fxprune.trace(e.model, X)
    cg = fxprune.analyze(gm)
    return lambda: fxprune.passes.finalize(gm, cg, fxprune.Decision(keep(cg)))


def _other_graph(e: Env):
    gm = fxprune.trace(e.model, X)
    other = fxprune.analyze(fxprune.trace(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)),
                                          (torch.randn(1, 3, 4, 4),)))
    return lambda: fxprune.passes.insert_gates(gm, other), ("computed from another module", "fxprune.analyze returned for it")


def _saved_then_loaded_into(e: Env, other: nn.Module):
    """Save a pruned model before the snapshot (the load under test must leave the file alone)."""
    path = e.tmp / "runs" / "saved.fxprune"
    fxprune.save(_result(e), path)
    return lambda: fxprune.load(other, path, X)


def _train(e: Env, data: DataLoader, model: nn.Module | None = None, **kw):
    return lambda: fxprune.compile(model if model is not None else e.model, "l1", HALF, X, train_loader=data,
                                   epochs=1, progress=False, **kw)


def _export(e: Env, target: Any = "model.onnx", model: Any = None, **kw):
    path = e.tmp / target if isinstance(target, str) else target
    kw.setdefault("example_inputs", X)
    return lambda: fxprune.export(e.model if model is None else model, path, **kw)


NO_TRT = pytest.mark.skipif(__import__("importlib").util.find_spec("tensorrt") is not None and torch.cuda.is_available(),
                            reason="TensorRT is available here")
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")

CASES: list[Any] = [
    # budgets
    ("budget-empty", ConfigError, lambda e: (lambda: fxprune.Budget(), ("needs flops", "fraction"))),
    ("budget-string", ConfigError, lambda e: (lambda: fxprune.Budget(flops="0.5"), ("flops='0.5'", "Budget(flops=0.5)"))),
    ("budget-zero", ConfigError, lambda e: (lambda: fxprune.Budget(flops=0), ("flops=0", "fraction in (0, 1]"))),
    ("budget-negative", ConfigError, lambda e: (lambda: fxprune.Budget(params=-0.5), ("params=-0.5", "fraction"))),
    ("budget-nan", ConfigError, lambda e: (lambda: fxprune.Budget(flops=math.nan), ("flops=nan", "finite number"))),
    ("budget-inf", ConfigError, lambda e: (lambda: fxprune.Budget(flops=math.inf), ("flops=inf", "finite number"))),
    ("budget-bool", ConfigError, lambda e: (lambda: fxprune.Budget(flops=True), ("flops=True", "finite number"))),
    ("budget-round-to-zero", ConfigError, lambda e: (lambda: fxprune.Budget(flops=0.5, round_to=0), ("round_to=0", ">= 1"))),
    ("budget-round-to-float", ConfigError, lambda e: (lambda: fxprune.Budget(flops=0.5, round_to=8.0), ("round_to=8.0", "int"))),
    ("budget-latency-above-one", ConfigError, lambda e: (lambda: fxprune.Budget(latency=2.0), ("latency=2.0", "latency_ms="))),
    ("budget-latency-unknown-backend", ConfigError, lambda e: (lambda: fxprune.prepare(
        e.model, "l1", fxprune.Budget(latency=0.5, backend="ort"), X), ("'ort'", "onnxruntime, torch"))),
    ("budget-typo", ConfigError, lambda e: (lambda: fxprune.Budget(flop=0.5), ("'flop'", "flops, params, latency"))),
    ("budget-below-floor", BudgetError, lambda e: (lambda: fxprune.compile(e.model, "l1", fxprune.Budget(flops=1e-6), X, progress=False),
                                                    ("below the floor", "raise the budget"))),
    ("budget-absolute-params-too-small", BudgetError, lambda e: (lambda: fxprune.prepare(e.model, "l1", fxprune.Budget(params=5), X),
                                                                  ("params budget 5", "raise the budget"))),
    ("budget-wide-round-to", BudgetError, lambda e: (lambda: fxprune.prepare(e.model, "l1", fxprune.Budget(flops=0.5, round_to=64), X),
                                                      ("64-wide", "raise the budget"))),
    ("budget-sparsity-one", ConfigError, lambda e: (lambda: fxprune.Budget(sparsity=1.0), ("sparsity=1.0", "Budget(sparsity=0.9)"))),
    ("budget-nm-reversed", ConfigError, lambda e: (lambda: fxprune.Budget(nm=(4, 2)), ("nm=(4, 2)", "nm=(2, 4)"))),
    ("budget-channels-and-weights", ConfigError, lambda e: (lambda: fxprune.Budget(flops=0.5, sparsity=0.9),
                                                            ("not both at once", "then compile the pruned model"))),
    ("sparsity-budget-channel-method", ConfigError, lambda e: (
        lambda: fxprune.compile(e.model, "l1", fxprune.Budget(sparsity=0.9), X, progress=False),
        ("method 'l1' removes channels", "use a weight method"))),
    ("flops-budget-weight-method", ConfigError, lambda e: (
        lambda: fxprune.compile(e.model, "gmp", HALF, X, progress=False),
        ("method 'gmp' zeroes single weights", "Budget(sparsity=0.9)"))),
    ("nm-budget-granet", ConfigError, lambda e: (
        lambda: fxprune.compile(e.model, "granet", fxprune.Budget(nm=(2, 4)), X, progress=False),
        ("does not reach Budget(nm=...)", "use cyclical, gmp, lap, nm"))),
    ("sparse-finetune-lop", ConfigError, lambda e: (
        lambda: fxprune.compile(e.model, "gmp", fxprune.Budget(sparsity=0.9), X, train_loader=loader(), finetune_epochs=1,
                                finetune_lop=True, progress=False),
        ("fill a sparse model's zeros", "without it"))),
    ("budget-dict", ConfigError, lambda e: (lambda: fxprune.compile(e.model, "l1", {"flops": 0.5}, X), ("got dict", "fxprune.Budget(flops=0.5)"))),
    ("budget-none", ConfigError, lambda e: (lambda: fxprune.compile(e.model, "l1", None, X), ("needs a budget", "Budget(flops=0.5)"))),
    ("budget-float", ConfigError, lambda e: (lambda: fxprune.prepare(e.model, "l1", 0.5, X), ("got float", "fxprune.Budget"))),
    # methods and their options
    ("method-unknown", ConfigError, lambda e: (lambda: fxprune.compile(e.model, "nope", HALF, X), ("unknown method 'nope'", "available"))),
    ("method-not-a-name", ConfigError, lambda e: (lambda: fxprune.compile(e.model, ["l1"], HALF, X), ("unknown method ['l1']", "available"))),
    ("method-option-unknown", ConfigError, lambda e: (lambda: fxprune.compile(e.model, "l1", HALF, X, method_options={"bogus": 1}),
                                                       ("no option(s) ['bogus']", "its options"))),
    ("method-option-type", ConfigError, lambda e: (lambda: fxprune.get_method("gdp", init="high"), ("init='high'", "float like its default"))),
    ("method-option-bool-for-float", ConfigError, lambda e: (lambda: fxprune.get_method("gdp", lam_rate=True), ("lam_rate=True", "float"))),
    ("method-option-range", ConfigError, lambda e: (lambda: fxprune.prepare(e.model, "gdp", HALF, X, total_steps=10, init=1.5),
                                                     ("init", "in (0, 1)"))),
    ("method-option-choice", ConfigError, lambda e: (lambda: fxprune.prepare(e.model, "gdp", HALF, X, total_steps=10, penalty="l2"),
                                                      ("penalty", "'flops' or 'uniform'"))),
    ("method-needs-training", ConfigError, lambda e: (lambda: fxprune.compile(e.model, "gdp", HALF, X), ("learns its decision", "train_loader"))),
    ("method-needs-total-steps", ConfigError, lambda e: (lambda: fxprune.prepare(e.model, "gdp", HALF, X), ("total_steps", "epochs * len(loader)"))),
    ("method-options-beside-instance", ConfigError, lambda e: (lambda: fxprune.get_method(fxprune.get_method("l1"), x=1),
                                                                ("options", "constructor"))),
    ("method-without-decide", ConfigError, lambda e: (lambda: fxprune.register_method(NoDecide), ("must define decide", "Decision"))),
    ("method-not-a-method", ConfigError, lambda e: (lambda: fxprune.register_method(nn.Conv2d), ("Method subclass", "own name"))),
    ("method-name-taken", ConfigError, lambda e: (lambda: fxprune.register_method(type("L1Again", (KeepAll,), {"name": "l1"})),
                                                   ("already registered", "another name"))),
    ("method-decides-over-budget", BudgetError, lambda e: (lambda: fxprune.compile(e.model, KeepAll(), HALF, X, progress=False),
                                                            ("misses its budget", "must meet ctx.targets"))),
    # models
    ("model-function", ConfigError, lambda e: (lambda: fxprune.compile(lambda x: x, "l1", HALF, X), ("expects an nn.Module", "function"))),
    ("model-class", ConfigError, lambda e: (lambda: fxprune.trace(TupleNet, X), ("class TupleNet", "TupleNet()"))),
    ("model-compile-result", ConfigError, lambda e: (lambda r=_result(e): fxprune.compile(r, "l1", HALF, X), ("CompileResult", "result.model"))),
    ("model-meta", ConfigError, _meta_model),
    ("model-nan-weight", ConfigError, _nan_weight),
    ("model-inf-buffer", ConfigError, _inf_buffer),
    ("model-old-weight-norm", ConfigError, _old_norm("weight_norm")),
    ("model-old-spectral-norm", ConfigError, _old_norm("spectral_norm")),
    ("model-value-control-flow", TraceError, lambda e: (lambda: fxprune.compile(ValueBranch(), "l1", HALF, X),
                                                         ("root module", "control flow on tensor values"))),
    ("model-wrong-input-channels", TraceError, lambda e: (lambda: fxprune.compile(e.model, "l1", HALF, (torch.randn(2, 5, 8, 8),)),
                                                           ("failed to run", "Check the example inputs' shapes"))),
    ("model-dtype-mismatch", TraceError, lambda e: (lambda: fxprune.trace(net().double(), X), ("failed to run", "example inputs"))),
    ("model-nothing-prunable", BudgetError, lambda e: (lambda: fxprune.prepare(nn.Sequential(nn.Flatten(), nn.Linear(192, 4)), "l1", HALF, X),
                                                        ("below the floor", "make more of the model prunable"))),
    ("model-tuple-output-trained", ConfigError, lambda e: (_train(e, loader(), TupleNet()), ("returns a tuple", "output="))),
    ("model-dict-output-evaluated", ConfigError, lambda e: (lambda: fxprune.compile(DictNet(), "l1", HALF, X, eval_loader=loader(), progress=False),
                                                             ("returns a dict", "out['logits']"))),
    # example inputs
    ("inputs-empty", ConfigError, lambda e: (lambda: fxprune.compile(e.model, "l1", HALF, ()), ("at least one torch.Tensor", "torch.randn"))),
    ("inputs-none", ConfigError, lambda e: (lambda: fxprune.prepare(e.model, "l1", HALF, None), ("got NoneType", "example_inputs=(torch.randn"))),
    ("inputs-numpy", ConfigError, lambda e: (lambda: fxprune.compile(e.model, "l1", HALF, X[0].numpy()), ("numpy arrays", "torch.from_numpy"))),
    ("inputs-numpy-in-tuple", ConfigError, lambda e: (lambda: fxprune.trace(e.model, (X[0].numpy(),)), ("numpy arrays", "torch.from_numpy"))),
    ("inputs-nan", ConfigError, lambda e: (lambda: fxprune.compile(e.model, "l1", HALF, (torch.full((2, 3, 8, 8), math.nan),)),
                                            ("NaN/Inf", "finite inputs"))),
    ("inputs-inf", ConfigError, lambda e: (lambda: fxprune.prepare(e.model, "l1", HALF, (X[0].clone().fill_(math.inf),)),
                                            ("example_inputs[0]", "finite inputs"))),
    ("inputs-meta", ConfigError, lambda e: (lambda: fxprune.trace(e.model, (X[0].to("meta"),)), ("meta device", "real tensor"))),
    ("inputs-string", ConfigError, lambda e: (lambda: fxprune.trace(e.model, "x"), ("got str", "tuple of tensors"))),
    ("inputs-dict", ConfigError, lambda e: (lambda: fxprune.trace(e.model, {"x": X[0]}), ("got dict", "tuple of tensors"))),
    # loaders and training arguments
    ("loader-dict-batches", ConfigError, lambda e: (_train(e, DataLoader(Pair(8, lambda i: {"image": X[0][0], "label": 1}), batch_size=4)),
                                                    ("dict batches", "(image, label)"))),
    ("loader-triples", ConfigError, lambda e: (_train(e, DataLoader(Pair(8, lambda i: (X[0][0], 1, "id")), batch_size=4)),
                                               ("list of 3", "(inputs, labels)"))),
    ("loader-non-tensor-inputs", ConfigError, lambda e: (_train(e, DataLoader(Pair(8, lambda i: ([1.0, 2.0], 1)), batch_size=4)),
                                                         ("inputs are a list", "ToTensor"))),
    ("loader-wrong-channels", ConfigError, lambda e: (_train(e, loader(shape=(1, 8, 8))), ("shape (8, 1, 8, 8)", "same channels"))),
    ("loader-wrong-rank", ConfigError, lambda e: (_train(e, loader(shape=(3, 64))), ("shape (8, 3, 64)", "same channels and rank"))),
    ("loader-label-too-large", ConfigError, lambda e: (_train(e, loader(labels=torch.arange(16) % 10)), ("is outside [0, 4)", "num_classes"))),
    ("loader-label-negative", ConfigError, lambda e: (_train(e, loader(labels=-torch.ones(16, dtype=torch.long))), ("label -1", "remap the labels"))),
    ("loader-float-labels", ConfigError, lambda e: (_train(e, loader(labels=torch.zeros(16))), ("dtype torch.float32", "labels.long()"))),
    ("loader-empty", ConfigError, lambda e: (_train(e, loader(n=4, batch=8, drop_last=True)), ("no batches", "drop_last"))),
    ("loader-batch-of-one-bn1d", ConfigError, lambda e: (_train(e, loader(n=17), BN1dNet()), ("batch of one", "drop_last=True"))),
    ("eval-loader-labels", ConfigError, lambda e: (lambda: fxprune.compile(e.model, "l1", HALF, X, eval_loader=loader(labels=torch.full((16,), 7)),
                                                                           progress=False), ("the evaluation loader: label 7", "num_classes"))),
    ("eval-loader-dicts", ConfigError, lambda e: (lambda: fxprune.compile(e.model, "l1", HALF, X, progress=False,
                                                                          eval_loader=DataLoader(Pair(4, lambda i: {"x": 1}), batch_size=2)),
                                                  ("dict batches", "(image, label)"))),
    ("epochs-negative", ConfigError, lambda e: (lambda: fxprune.compile(e.model, "l1", HALF, X, train_loader=loader(), epochs=-1),
                                                ("epochs must be an int >= 0", "-1"))),
    ("epochs-float", ConfigError, lambda e: (lambda: fxprune.compile(e.model, "l1", HALF, X, train_loader=loader(), epochs=2.5),
                                             ("epochs must be an int", "2.5"))),
    ("epochs-without-loader", ConfigError, lambda e: (lambda: fxprune.compile(e.model, "l1", HALF, X, epochs=3, finetune_epochs=2),
                                                      ("epochs=3", "need a train_loader"))),
    ("finetune-without-loader", ConfigError, lambda e: (lambda: fxprune.compile(e.model, "l1", HALF, X, finetune_epochs=2),
                                                        ("finetune_epochs=2", "need a train_loader"))),
    ("lr-negative", ConfigError, lambda e: (_train(e, loader(), lr=-0.1), ("lr must be a positive number", "-0.1"))),
    # passes
    ("gates-other-graph", AnalysisError, _other_graph),
    ("decision-unknown-group", ConfigError, lambda e: (_decision_of(e, lambda cg: {99: np.ones(2, bool)}),
                                                       ("groups [99]", "build the Decision from the graph"))),
    ("decision-unprunable-group", ConfigError, lambda e: (_decision_of(e, lambda cg: {g.id: np.arange(g.size) > 0 for g in cg.groups if not g.prunable}),
                                                          ("not prunable", "keep every unit"))),
    ("finalize-not-prepared", ConfigError, lambda e: (lambda: fxprune.finalize(fxprune.trace(e.model, X)),
                                                      ("expects what fxprune.prepare returned", "fxprune.passes.finalize"))),
    # keeping the result
    ("save-not-finalized", ConfigError, lambda e: (lambda: fxprune.save(e.model, e.tmp / "runs" / "m.fxprune"),
                                                   ("without a pruning record", "torch.save(model.state_dict()"))),
    ("load-not-a-record", ConfigError, lambda e: (lambda: fxprune.load(e.model, e.tmp / "model.onnx", X),
                                                  ("not a file fxprune.save wrote", "model.onnx"))),
    ("load-other-architecture", ConfigError, lambda e: (_saved_then_loaded_into(e, net(classes=5)),
                                                        ("architecture or the input size changed", "same code"))),
    # export and latency
    ("export-compile-result", ConfigError, lambda e: (_export(e, model=_result(e)), ("CompileResult", "result.model"))),
    ("export-wrong-shape", ConfigError, lambda e: (_export(e, example_inputs=(torch.randn(2, 5, 8, 8),)),
                                                   ("fails on example_inputs of shapes [(2, 5, 8, 8)]", "inputs the model accepts"))),
    ("export-no-inputs", ConfigError, lambda e: (_export(e, example_inputs=None), ("example_inputs", "torch.randn"))),
    ("export-parent-is-file", ConfigError, lambda e: (_export(e, target="keep.txt/model.onnx"), ("is a file", "another path"))),
    ("export-path-is-folder", ConfigError, lambda e: (_export(e, target="runs"), ("is a folder", "model.onnx"))),
    ("export-unwritable", ConfigError, lambda e: (_export(e, target=Path("/proc/fxprune/model.onnx")), ("cannot write into /proc/fxprune", "writable path"))),
    ("export-unknown-backend", ConfigError, lambda e: (_export(e, backend="coreml"), ("unknown export backend 'coreml'", "valid: onnx, tensorrt"))),
    ("export-fp16-onnx", ConfigError, lambda e: (_export(e, fp16=True), ("fp16=True", "backend='tensorrt'"))),
    ("export-validation-fails", ExportError, lambda e: (_export(e, model=RandomOut()), ("differs from PyTorch", "atol"))),
    pytest.param("export-tensorrt-missing", BackendUnavailable, lambda e: (_export(e, target="model.engine", backend="tensorrt"),
                                                                           ("TensorRT backend unavailable", "pip install")),
                 marks=NO_TRT, id="export-tensorrt-missing"),
    ("latency-unknown-backend", ConfigError, lambda e: (lambda: measure_latency(e.model, "tflite", example_inputs=X),
                                                        ("unknown latency backend 'tflite'", "valid"))),
    ("latency-zero-repeats", ConfigError, lambda e: (lambda: compare_latency(e.model, e.model, example_inputs=X, repeats=0),
                                                     ("rounds and repeats must be >= 1", "0"))),
    ("compile-validate-unknown", ConfigError, lambda e: (lambda: fxprune.compile(e.model, "l1", HALF, X, validate=["gpu"]),
                                                         ("unknown latency backend 'gpu'", "valid"))),
    pytest.param("budget-latency-tensorrt-missing", BackendUnavailable, lambda e: (lambda: fxprune.prepare(
        e.model, "l1", fxprune.Budget(latency=0.5, backend="tensorrt"), X), ("TensorRT backend unavailable", "missing")),
                 marks=NO_TRT, id="budget-latency-tensorrt-missing"),
    pytest.param("compile-validate-no-cuda", BackendUnavailable, lambda e: (lambda: fxprune.compile(e.model, "l1", HALF, X, validate="torch-cuda"),
                                                                            ("needs a CUDA GPU", "CUDA-enabled PyTorch")),
                 marks=NO_CUDA, id="compile-validate-no-cuda"),
]


def _params(cases: list[Any]) -> list[Any]:
    """Table rows as pytest params named by their first field (rows with marks already are)."""
    return [c if hasattr(c, "marks") else pytest.param(*c, id=c[0]) for c in cases]


@pytest.mark.parametrize("name, error, build", _params(CASES))
def test_bad_input_gets_a_named_error(name, error, build, tmp_path):
    """The error class, the problem and the remedy in its message; the user's model and every file
    in the working folder exactly as before (no partial or temporary file left behind)."""
    (tmp_path / "keep.txt").write_text("the user's file")
    (tmp_path / "model.onnx").write_bytes(b"an older export that must survive a failed one")
    (tmp_path / "runs").mkdir()
    env = Env(tmp_path, net())
    call, phrases = build(env)
    before, files = model_state(env.model), files_state(tmp_path)
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    for phrase in phrases:
        assert phrase in message, f"{name}: {phrase!r} not in {message!r}"
    same_model(env.model, before)
    assert files_state(tmp_path) == files


def test_the_catalogue_has_at_least_sixty_cases():
    assert len(CASES) + len(CLI_CASES) >= 60


# ---- the CLI: everything checkable is checked before the long work -------------------------------------
def _cli_out(kind: str, tmp: Path) -> list[str]:
    if kind == "file":
        return ["--out", str(tmp / "keep.txt")]
    if kind == "old-run":
        return ["--out", str(tmp)]
    if kind == "unwritable":
        return ["--out", "/proc/fxprune-run"]
    return ["--out", str(tmp / "new")]


CLI_CASES: list[Any] = [
    ("flops-zero", ["--flops", "0"], "new", ("flops=0", "fraction in (0, 1]")),
    ("flops-negative", ["--flops", "-0.5"], "new", ("flops=-0.5", "fraction")),
    ("round-to-zero", ["--round-to", "0"], "new", ("round_to=0", ">= 1")),
    ("epochs-negative", ["--epochs", "-1"], "new", ("epochs must be an int >= 0", "-1")),
    ("image-size-zero", ["--image-size", "0"], "new", ("image_size must be a positive int", "0")),
    ("out-is-file", [], "file", ("is a file", "another path")),
    ("out-holds-a-run", [], "old-run", ("already holds files", "--overwrite")),
    ("out-unwritable", [], "unwritable", ("cannot write into /proc/fxprune-run", "writable path")),
    ("method-unknown", ["--method", "nope"], "new", ("invalid choice: 'nope'", "choose from")),
    pytest.param("export-tensorrt-missing", ["--export", "tensorrt"], "new", ("TensorRT backend unavailable", "pip install"),
                 marks=NO_TRT, id="export-tensorrt-missing"),
    pytest.param("validate-no-cuda", ["--validate", "torch-cuda"], "new", ("needs a CUDA GPU", "CUDA-enabled PyTorch"),
                 marks=NO_CUDA, id="validate-no-cuda"),
]


@pytest.mark.parametrize("name, args, out, phrases", _params(CLI_CASES))
def test_cli_refuses_before_any_work(name, args, out, phrases, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("an older run's file")
    files = files_state(tmp_path)
    try:
        code = cli(["compile", "--model", "resnet20", "--epochs", "1", "--finetune-epochs", "0", "--image-size", "8",
                    "--no-progress", *_cli_out(out, tmp_path), *args])
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    for phrase in phrases:
        assert phrase in err, f"{name}: {phrase!r} not in {err!r}"
    assert "error" in err and "Traceback" not in err
    assert files_state(tmp_path) == files
    assert not (tmp_path / "new").exists() or not any((tmp_path / "new").iterdir())


def test_cli_bench_refuses_an_unwritable_output_before_running(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("a file where a folder should be")
    code = cli(["bench", "--methods", "l1", "--seeds", "0", "--flops", "0.5", "--no-progress",
                "--out", str(tmp_path / "keep.txt" / "methods")])
    assert code == 2
    assert "keep.txt is a file" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "a file where a folder should be"


def test_cli_overwrite_replaces_an_older_run_and_only_its_files(tmp_path):
    (tmp_path / "model.onnx").write_text("an older run's export, which this run does not write")
    (tmp_path / "notes.txt").write_text("the user's own file")
    code = cli(["compile", "--model", "resnet20", "--method", "l1", "--epochs", "0", "--finetune-epochs", "0",
                "--image-size", "8", "--no-progress", "--out", str(tmp_path), "--overwrite"])
    assert code == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["model.fxprune", "model.pt", "notes.txt", "report.html", "report.json", "summary.txt"]


# ---- unusual models that deserve a result: a warning and a correct, checked model ------------------------
def _pruned_matches(model: nn.Module, result) -> None:
    assert result.report.pruned["flops"] <= result.report.target["flops"]
    assert result.report.equivalence["max_rel_diff"] < 1e-4


def test_dataparallel_is_unwrapped_with_a_warning():
    inner = net()
    wrapped = nn.DataParallel(inner)
    before = model_state(wrapped)
    with pytest.warns(FxpruneWarning, match="model.module"):
        result = fxprune.compile(wrapped, "l1", HALF, X, progress=False)
    _pruned_matches(inner, result)
    assert not isinstance(result.model, nn.DataParallel)
    same_model(wrapped, before)


def test_user_hooks_do_not_run_and_do_not_leak_proxies():
    """A feature-collecting hook (the usual kind) must not see tracing's or compile's work; the
    user is told that the pruned model has no hooks."""
    model = net()
    seen: list[Any] = []
    model[3].register_forward_hook(lambda mod, inp, out: seen.append(out))
    with pytest.warns(FxpruneWarning, match=r"hooks on '3' \(forward\)"):
        result = fxprune.compile(model, "l1", HALF, X, eval_loader=loader(), progress=False)
    assert seen == []
    assert len(model[3]._forward_hooks) == 1
    model(X[0])  # the user's model still runs its hook
    assert len(seen) == 1 and isinstance(seen[0], torch.Tensor)
    _pruned_matches(model, result)


def test_parametrized_conv_is_kept_whole_with_a_warning():
    model = net()
    torch.nn.utils.parametrizations.weight_norm(model[0])
    with pytest.warns(FxpruneWarning, match=r"parametrized modules '0'.*remove_parametrizations"):
        result = fxprune.compile(model, "l1", HALF, X, progress=False)
    _pruned_matches(model, result)
    assert result.model.get_submodule("0").out_channels == 8  # its channels stay
    assert result.model.get_submodule("3").out_channels < 8


def test_a_last_batch_of_one_warns_and_a_tuple_output_trains_with_output_selector():
    with pytest.warns(FxpruneWarning, match="drop_last=True"):
        result = fxprune.compile(TupleNet(), "l1", HALF, X, train_loader=loader(n=17), eval_loader=loader(),
                                 epochs=1, progress=False, output=lambda out: out[0])
    assert result.report.accuracy["pruned"] is not None
    assert result.report.pruned["flops"] <= result.report.target["flops"]
