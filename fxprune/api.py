"""The user-facing flow: prepare -> train -> finalize (compile composes them with a trainer)."""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx

from fxprune.analysis import analyze
from fxprune.budget import Budget, Targets
from fxprune.cost import CostModel, count_macs
from fxprune.errors import ConfigError
from fxprune.ir import ChannelGraph
from fxprune.passes.finalize import FinalizeReport
from fxprune.passes.finalize import finalize as finalize_pass
from fxprune.passes.methods import Method, get_method
from fxprune.tracing import trace


@dataclass
class Prepared:
    """A gated copy of the user's model plus its method, for any training loop.

    Per training step: ``loss = task_loss + prepared.loss()``, backward, optimizer step, then
    ``prepared.step()``. ``fxprune.finalize(prepared)`` returns the pruned module.
    """

    module: fx.GraphModule
    method: Method
    channel_graph: ChannelGraph
    cost: CostModel
    targets: Targets
    finalize_report: FinalizeReport | None = None

    def loss(self) -> torch.Tensor:
        extra = self.method.loss()
        return extra if extra is not None else torch.zeros(())

    def step(self) -> None:
        self.method.step()

    def model_parameters(self) -> list[torch.nn.Parameter]:
        """The network's own parameters (gates excluded: they want their own optimizer settings)."""
        gate_ids = {id(p) for p in self.method.gate_parameters()}
        return [p for p in self.module.parameters() if id(p) not in gate_ids and p.requires_grad]

    def gate_parameters(self) -> list[torch.nn.Parameter]:
        return self.method.gate_parameters()

    def current_flops(self) -> int:
        """MACs per example if every unit with a non-zero gate were kept."""
        keep = {gid: (g.values() != 0).detach().numpy() for gid, g in self.method.gates.items()}
        return int(self.cost.macs(keep))

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "method": self.method.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.method.load_state_dict(state["method"])


def prepare(model: torch.nn.Module, method: str | Method = "gdp", budget: Budget | None = None,
            example_inputs: Sequence[Any] = (), **method_options: Any) -> Prepared:
    """Trace and analyze ``model`` (a copy), resolve ``budget`` and insert the method's gates."""
    if budget is None:
        raise ConfigError("prepare needs a budget, e.g. fxprune.Budget(flops=0.5)")
    if not example_inputs:
        raise ConfigError("prepare needs example_inputs, e.g. (torch.randn(1, 3, 32, 32),)")
    gm = trace(model, example_inputs)
    cg = analyze(gm)
    cost = CostModel(gm, cg)
    targets = budget.resolve(cost)
    m = get_method(method, **method_options)
    gated = m.prepare(gm, cg, cost, targets)
    return Prepared(gated, m, cg, cost, targets)


def finalize(prepared: Prepared, rtol: float = 1e-4) -> fx.GraphModule:
    """Let the method decide, then remove the pruned channels for real (checked for equivalence)."""
    prepared.method.decide()
    report = FinalizeReport()
    model = finalize_pass(prepared.module, prepared.channel_graph, rtol=rtol, report=report)
    prepared.finalize_report = report
    return model


@dataclass
class CompileReport:
    """What compile did and measured; ``to_json`` gives the file the CLI writes."""

    method: str
    method_options: dict[str, Any]
    budget: dict[str, Any]
    flops_unit: str
    dense: dict[str, int]
    pruned: dict[str, int]
    target: dict[str, int | None]
    groups: list[dict[str, Any]]
    accuracy: dict[str, float | None] = field(default_factory=dict)
    equivalence: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    removed_branches: list[str] = field(default_factory=list)
    retained: dict[int, str] = field(default_factory=dict)
    latency: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def summary(self) -> str:
        d, p = self.dense, self.pruned
        lines = [
            f"method {self.method}, budget {self.budget}",
            f"MACs/example  {d['flops']:>14,} -> {p['flops']:>14,}  ({p['flops'] / d['flops']:.1%})",
            f"parameters    {d['params']:>14,} -> {p['params']:>14,}  ({p['params'] / d['params']:.1%})",
            f"groups pruned {sum(g['kept'] < g['size'] for g in self.groups)} of {len(self.groups)}",
            f"finalize check: max relative difference {self.equivalence.get('max_rel_diff', float('nan')):.2e}",
        ]
        for k, v in self.accuracy.items():
            if v is not None:
                lines.append(f"accuracy ({k}) {v:.4f}")
        if self.latency:
            lines.append(f"latency ({self.latency['settings']['backend']}): speedup {self.latency['speedup']:.2f}x "
                         f"(dense {self.latency['dense']['median_ms']:.3f} ms, pruned {self.latency['pruned']['median_ms']:.3f} ms)")
        lines.append("time " + ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items()))
        return "\n".join(lines)


@dataclass
class CompileResult:
    model: fx.GraphModule
    report: CompileReport
    prepared: Prepared


def _accuracy(model: torch.nn.Module, loader) -> float | None:
    if loader is None:
        return None
    from fxprune.train import evaluate

    return evaluate(model, loader)


def compile(model: torch.nn.Module, method: str | Method = "gdp", budget: Budget | None = None,
            example_inputs: Sequence[Any] = (), train_loader=None, eval_loader=None, epochs: int = 0,
            finetune_epochs: int = 0, lr: float = 0.05, gate_lr: float = 0.2,
            weight_decay: float = 5e-4, progress: bool = True, validate: Sequence[str] = (),
            method_options: dict[str, Any] | None = None, log=None) -> CompileResult:
    """Prune ``model`` to ``budget`` with ``method``; the user's model is left untouched.

    Phases: prepare (trace, analyze, gate); train ``epochs`` with the method's loss and schedule
    (gates at 1 for methods that do not train, so this is ordinary training); decide and
    finalize; fine-tune the pruned model ``finetune_epochs``; optionally measure latency
    (``validate=["onnxruntime"]``).
    """
    from fxprune.train import train

    seconds: dict[str, float] = {}
    t = time.perf_counter()
    options = dict(method_options or {})
    m = get_method(method, **options)
    if m.needs_training and (train_loader is None or epochs <= 0):
        raise ConfigError(f"method {m.name!r} learns its decision: pass train_loader and epochs > 0")
    if hasattr(m, "total_steps") and train_loader is not None and m.total_steps is None:
        m.total_steps = epochs * len(train_loader)
    prepared = prepare(model, m, budget, example_inputs)
    seconds["prepare"] = time.perf_counter() - t
    acc = {"input": _accuracy(copy.deepcopy(model), eval_loader)}  # the model as given (untrained: chance)
    logs: list[dict[str, Any]] = []

    def record(phase: str):
        return lambda entry: logs.append({"phase": phase, **entry})

    if epochs > 0 and train_loader is not None:
        t = time.perf_counter()
        groups = [{"params": prepared.gate_parameters(), "lr": gate_lr, "weight_decay": 0.0}] if prepared.gate_parameters() else None
        for e in train(prepared.module, train_loader, epochs, lr=lr, weight_decay=weight_decay,
                       params=prepared.model_parameters(), extra_param_groups=groups,
                       extra_loss=prepared.method.loss if m.needs_training else None,
                       on_step=lambda s: prepared.step(), eval_loader=eval_loader, progress=progress,
                       desc=f"{m.name} train", epoch_metrics=lambda: {"macs": prepared.current_flops()}):
            logs.append({"phase": "train", **asdict(e)})
        seconds["train"] = time.perf_counter() - t
        acc["gated"] = _accuracy(prepared.module, eval_loader)
    t = time.perf_counter()
    pruned = finalize(prepared)
    seconds["finalize"] = time.perf_counter() - t
    acc["pruned"] = _accuracy(pruned, eval_loader)
    if finetune_epochs > 0 and train_loader is not None:
        t = time.perf_counter()
        for e in train(pruned, train_loader, finetune_epochs, lr=lr, weight_decay=weight_decay,
                       eval_loader=eval_loader, progress=progress, desc="fine-tune"):
            logs.append({"phase": "finetune", **asdict(e)})
        seconds["finetune"] = time.perf_counter() - t
        acc["finetuned"] = _accuracy(pruned, eval_loader)
    pruned.eval()
    report = _report(model, pruned, prepared, m, budget, example_inputs, acc, seconds, logs)
    if validate:
        t = time.perf_counter()
        report.latency = _validate(model, pruned, example_inputs, validate)
        seconds["validate"] = time.perf_counter() - t
    return CompileResult(pruned, report, prepared)


def _report(model, pruned, prepared: Prepared, m: Method, budget: Budget, example_inputs, acc, seconds, logs) -> CompileReport:
    fin = prepared.finalize_report
    dense_params = sum(p.numel() for p in model.parameters())
    return CompileReport(
        method=m.name,
        method_options=m.describe(),
        budget=budget.to_dict(),
        flops_unit="multiply-accumulates (MACs) of conv and linear layers per example",
        dense={"flops": prepared.targets.dense_macs, "params": dense_params},
        pruned={"flops": count_macs(pruned, example_inputs), "params": sum(p.numel() for p in pruned.parameters())},
        target={"flops": prepared.targets.macs, "params": prepared.targets.params},
        groups=[{"id": g.id, "size": g.size, "kept": fin.kept.get(g.id, g.size), "prunable": g.prunable,
                 "reason": g.reason, "producers": g.spaces} for g in prepared.channel_graph.groups],
        accuracy=acc,
        equivalence={"max_abs_diff": fin.max_abs_diff, "max_rel_diff": fin.max_rel_diff},
        seconds=seconds,
        epochs=logs,
        removed_branches=fin.removed_branches,
        retained=fin.retained,
    )


def _validate(dense, pruned, example_inputs, backends: Sequence[str]) -> dict[str, Any]:
    from fxprune.backends import compare_latency

    backends = [backends] if isinstance(backends, str) else list(backends)
    unknown = set(backends) - {"onnxruntime", "torch", "torch-cuda", "tensorrt"}
    if unknown:
        raise ConfigError(f"unknown validate backend(s) {sorted(unknown)}; use onnxruntime, torch, torch-cuda or tensorrt")
    results = {b: compare_latency(copy.deepcopy(dense).eval(), pruned, backend=b,
                                  example_inputs=tuple(example_inputs)).to_dict() for b in backends}
    return results[backends[0]] if len(results) == 1 else {"backends": results, **results[backends[0]]}

