"""The user-facing flow: prepare -> train -> finalize (compile composes them with a trainer).

This layer sits above the core (``fxprune.ir``, ``analysis``, ``cost``, ``budget``, ``method``
...), the passes and the backends; none of those imports it.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

import fxprune.passes.methods  # noqa: F401  (registers the built-in methods)
from fxprune.analysis import analyze
from fxprune.budget import Budget, Targets
from fxprune.cost import CostModel, count_macs
from fxprune.decision import Decision
from fxprune import checks
from fxprune.errors import BudgetError, ConfigError, EquivalenceError, FxpruneWarning
from fxprune.ir import ChannelGraph
from fxprune.modcopy import copy_module
from fxprune.method import METHODS, Context, Method
from fxprune.passes.bnstats import BNStatsReport, reestimate
from fxprune.passes.compensate import CompensationReport
from fxprune.passes.compensate import compensate as compensate_pass
from fxprune.passes.finalize import FinalizeReport
from fxprune.passes.finalize import finalize as finalize_pass
from fxprune.passes import lop
from fxprune.passes.gates import apply_decision
from fxprune.passes.masks import has_masks, remove_masks
from fxprune import sparsity as sp
from fxprune.tracing import trace


def _check_budget(budget: Any, where: str) -> None:
    if budget is None:
        raise ConfigError(f"{where} needs a budget, e.g. fxprune.Budget(flops=0.5)")
    if not isinstance(budget, Budget):
        raise ConfigError(f"{where}: budget must be an fxprune.Budget, got {type(budget).__name__} ({budget!r}); "
                          "e.g. fxprune.Budget(flops=0.5)")


def _check_granularity(m: Method, budget: Budget) -> None:
    if budget.weights and m.granularity != "weight":
        raise ConfigError(f"method {m.name!r} removes channels, and Budget(sparsity=/nm=) limits single weights: use a "
                          f"weight method ({', '.join(n for n, c in sorted(METHODS.items()) if c.granularity == 'weight')}"
                          ") or a channel budget, Budget(flops=...)")
    if not budget.weights and m.granularity == "weight":
        raise ConfigError(f"method {m.name!r} zeroes single weights: give it Budget(sparsity=0.9) or Budget(nm=(2, 4)); "
                          "to prune channels use a channel method (l1, gdp, ...) with Budget(flops=...)")


def get_method(method: str | Method, **options: Any) -> Method:
    """A method instance from its registered name (``fxprune.method.METHODS``) or an instance.

    Raises ``ConfigError`` for an unknown name or option, and for options beside an instance."""
    if isinstance(method, Method):
        if options:
            raise ConfigError("pass options to the method's constructor, not beside an instance")
        return method
    if not isinstance(method, str) or method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; available: {sorted(METHODS)} (or a fxprune.Method instance)")
    return METHODS[method](**options)


@dataclass
class Prepared:
    """A working copy of the user's model plus its method and context, for any training loop.

    Per step: ``loss = task_loss + prepared.loss()``, ``loss.backward()``,
    ``prepared.after_backward()``, optimizer step, ``prepared.step()`` (a method that owns the
    step: ``prepared.train_step(batch, optimizer)`` instead). ``fxprune.finalize(prepared)``
    returns the pruned module.
    """

    method: Method
    ctx: Context
    finalize_report: FinalizeReport | None = None
    decision: Decision | None = None
    measured: dict[str, int] | None = None  # the finalized module's MACs and parameters, counted
    compensation: CompensationReport | None = None
    sparsity: sp.SparsityReport | None = None  # a weight budget's zeros, counted on the finalized module
    budget: Budget | None = None
    latency_model: Any = None  # a latency budget's fxprune.flow.latency_model.LatencyModel
    latency: dict[str, Any] | None = None  # a latency budget: target, predicted and measured, per attempt
    bn_stats: BNStatsReport | None = None  # finalize's BatchNorm re-estimation: norms reset, batches read

    @property
    def module(self) -> fx.GraphModule:
        return self.ctx.module

    @property
    def channel_graph(self) -> ChannelGraph:
        return self.ctx.graph

    @property
    def cost(self) -> CostModel:
        return self.ctx.cost

    @property
    def targets(self) -> Targets:
        return self.ctx.targets

    def loss(self) -> torch.Tensor:
        extra = self.method.loss(self.ctx)
        return extra if extra is not None else torch.zeros(())

    def after_backward(self) -> None:
        self.method.after_backward(self.ctx)

    def step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """After the optimizer step: count it, then advance the method's schedules. Pass the
        ``optimizer`` for methods that edit its state (weight methods clear the momentum of
        removed weights; sculpt starts each cycle with a fresh state)."""
        if optimizer is not None:
            self.ctx.optimizer = optimizer
        self.ctx.step += 1
        self.method.after_step(self.ctx)

    def lr_factor(self, step: int) -> float:
        """The method's learning-rate multiplier at 0-based ``step`` (sculpt's per-cycle rate); 1.0
        where the method leaves the rate to your schedule. ``LambdaLR(opt, prepared.lr_factor)``."""
        factor = self.method.lr_factor(self.ctx, step)
        return 1.0 if factor is None else factor

    def train_step(self, batch: Any, optimizer: torch.optim.Optimizer) -> tuple[torch.Tensor, torch.Tensor]:
        """The method's own step (for methods that define ``train_step``), then ``step()``."""
        if self.method.train_step is None:
            raise ConfigError(f"method {self.method.name!r} does not own the training step; use loss/step")
        out = self.method.train_step(self.ctx, batch, optimizer)
        self.step(optimizer)
        return out

    def model_parameters(self) -> list[torch.nn.Parameter]:
        """The network's own parameters (the method's excluded: they want their own settings)."""
        own = {id(p) for p in self.method.parameters(self.ctx)}
        return [p for p in self.module.parameters() if id(p) not in own and p.requires_grad]

    def method_parameters(self) -> list[torch.nn.Parameter]:
        return self.method.parameters(self.ctx)

    def current_flops(self, decision: Decision | None = None) -> int:
        """MACs per example of the current decision (the method's ``decide`` if none given)."""
        decision = decision if decision is not None else self.method.decide(self.ctx)
        return int(self.cost.macs(decision.keep))

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "method": self.method.state_dict(), "step": self.ctx.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.method.load_state_dict(state["method"])
        self.ctx.step = int(state["step"])


def prepare(model: torch.nn.Module, method: str | Method = "gdp", budget: Budget | None = None,
            example_inputs: Sequence[Any] = (), total_steps: int | None = None, progress: bool = True,
            latency_model: dict[str, Any] | None = None, **method_options: Any) -> Prepared:
    """Trace and analyze ``model`` (a copy), resolve ``budget`` and let the method prepare.

    A budget that names a backend reads its channel multiple (the width step unless the budget
    sets ``round_to``); a latency budget also gets the backend's latency predictor
    (``fxprune.flow.latency_model``, from the cache or measured now, with a progress bar when
    ``progress``; ``latency_model``: options of ``build_latency_model`` such as ``samples``) as
    the cost model's ``"latency"`` resource. Raises ``ConfigError`` (missing
    budget or inputs, unknown method or option or backend, a method that schedules over the run
    without ``total_steps``, a channel method with a sparsity budget or the reverse, NaN/Inf
    weights or inputs, and what ``trace`` refuses), ``BackendUnavailable`` (the budget's backend
    cannot run here: raised before any work), ``TraceError``, ``BudgetError`` (a budget below
    what the unprunable layers cost).
    """
    from fxprune.backends import require_backend

    _check_budget(budget, "fxprune.prepare")
    record = require_backend(budget.backend) if budget.backend is not None else None
    example_inputs = checks.example_inputs(example_inputs, "fxprune.prepare")
    m = get_method(method, **method_options)
    _check_granularity(m, budget)
    if budget.timed and "latency" not in m.resources:
        raise ConfigError(f"method {m.name!r} does not prune to a latency budget; methods that do: "
                          f"{', '.join(n for n, c in sorted(METHODS.items()) if 'latency' in c.resources)}")
    if m.needs_total_steps and not total_steps:
        raise ConfigError(f"{m.name} needs total_steps (the number of optimizer steps you will train) for its "
                          "schedules: fxprune.prepare(..., total_steps=epochs * len(loader))")
    gm = trace(model, example_inputs)
    checks.finite_state(gm, "fxprune.prepare")
    cg = analyze(gm)
    cost = CostModel(gm, cg)
    multiple = record.multiple().value if record is not None and budget.round_to is None else None
    latency_model = None
    if budget.timed:
        from fxprune.flow.latency_model import build_latency_model

        options = {"multiple": multiple or budget.round_to, "progress": progress, **dict(latency_model or {})}
        latency_model = build_latency_model(gm, cg, budget.backend, **options)
        cost.add_resource("latency", latency_model.predictor.resource)
    ctx = Context(gm, gm, cg, cost, budget.resolve(cost, multiple), tuple(gm.meta["fxprune_example_inputs"]),
                  dict(gm.meta.get("fxprune_leaf_modules", {})), total_steps=total_steps, show_progress=progress)
    m.prepare(ctx)
    return Prepared(m, ctx, budget=budget, latency_model=latency_model)


def finalize(prepared: Prepared, data: Any = None, rtol: float = 1e-4, compensate: bool | dict[str, Any] = False,
             progress: bool = False, bn_recalibration: int = 0) -> fx.GraphModule:
    """Let the method decide (``data``: a calibration loader for data-driven methods), then
    remove the pruned channels for real. ``compensate=True`` first refits the consumers of removed
    channels to the unpruned module's outputs on ``data`` (``fxprune.passes.compensate``; a dict
    gives its options, e.g. ``{"ridge": 1e-4}``; its report is ``prepared.compensation``); the finalized module is then checked against the
    compensated one. The result is checked twice: it computes what the
    decision means, and its cost, measured on the finalized module itself (its MACs counted by
    tracing it, its parameters counted; under a sparsity budget its zero weights, globally, per
    layer or per N:M group), meets the budget. ``prepared.measured`` (and ``prepared.sparsity``)
    hold what was counted. A weight method's masks are baked into the weights: the result is a
    plain module, no parametrization left. ``bn_recalibration=N`` (batches, 0: off) then re-estimates
    every BatchNorm's running statistics on the first N batches of ``data``
    (``fxprune.passes.bnstats``): after the equivalence check, since it changes the outputs on
    purpose (the dense statistics are stale once channels left); ``prepared.bn_stats`` says what
    it read. Raises ``EquivalenceError`` (the finalized module computes something else),
    ``BudgetError`` (a decision above the budget, or units finalize had to keep because removed
    channels feed them constants), ``ConfigError`` (not a ``Prepared``; a decision that does not
    fit the channel graph; ``bn_recalibration`` not an int >= 0, or > 0 without ``data``).
    """
    if not isinstance(prepared, Prepared):
        raise ConfigError(f"fxprune.finalize expects what fxprune.prepare returned, got {type(prepared).__name__}; "
                          "for a traced module and a Decision use fxprune.passes.finalize(gm, graph, decision)")
    _check_bn_recalibration(bn_recalibration, data, "fxprune.finalize", "data=<a calibration loader>")
    model = _finalize_once(prepared, data, rtol, compensate, progress)
    if prepared.targets.backend is not None and "latency" in prepared.targets.limits:
        model = _meet_latency(prepared, model, data, rtol, compensate, progress)
    if prepared.targets.weights is not None:
        _count_zeros(prepared, model)
        if prepared.sparsity.empty:  # within budget, but a layer that passes nothing on
            warnings.warn(f"finalize: {', '.join(prepared.sparsity.empty)} kept no non-zero weight (one global threshold "
                          "over all layers emptied them): what follows sees only biases. Use Budget(scope='layer') or "
                          "a lower sparsity, or keep such layers dense (dense_ends=True for the first and last)",
                          FxpruneWarning, stacklevel=2)
    if bn_recalibration:
        _recalibrate(prepared, model, data, bn_recalibration)
    return model


def _check_bn_recalibration(batches: Any, data: Any, where: str, pass_data: str) -> None:
    """``bn_recalibration`` is a number of batches (0: off) and needs data to read them from."""
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 0:
        raise ConfigError(f"{where}: bn_recalibration is a number of calibration batches (0: off), got {batches!r}")
    if batches and data is None:
        raise ConfigError(f"{where}: bn_recalibration={batches} re-estimates BatchNorm statistics on calibration "
                          f"batches: pass {pass_data}, or bn_recalibration=0")


def _recalibrate(prepared: Prepared, model: torch.nn.Module, data: Any, batches: int) -> None:
    """Re-estimate the finalized model's BatchNorm statistics in place; the report goes to ``prepared.bn_stats``."""
    prepared.bn_stats = reestimate(model, data, batches, where="the calibration data of bn_recalibration")


def _finalize_once(prepared: Prepared, data: Any, rtol: float, compensate: bool | dict[str, Any],
                   progress: bool) -> fx.GraphModule:
    """The method's decision under ``prepared.targets``, finalized, counted and checked."""
    decision = prepared.method.decide(prepared.ctx, data)
    report = FinalizeReport()
    cg = prepared.channel_graph
    module = remove_masks(prepared.module) if has_masks(prepared.module) else prepared.module
    if compensate:
        complete = decision.complete(cg)
        applied = apply_decision(module, cg, complete)
        options = dict(compensate) if isinstance(compensate, dict) else {}
        applied, fitted = compensate_pass(applied, module, cg, complete.keep, data,
                                          weight_masks=decision.weight_masks, progress=progress, **options)
        prepared.compensation = fitted
        model = finalize_pass(applied, cg, rtol=rtol, report=report)  # the gates hold the decision
    else:
        model = finalize_pass(module, cg, decision, rtol=rtol, report=report)
    prepared.decision, prepared.finalize_report = decision, report
    measured = {"macs": count_macs(model, prepared.ctx.example_inputs),
                "params": sum(p.numel() for p in model.parameters())}
    prepared.measured = measured
    over = {name: (measured[name], limit) for name, limit in prepared.targets.limits.items()
            if name in measured and measured[name] > limit}  # latency is measured on its backend afterwards
    if over:
        said = ", ".join(f"{name} {got:,} > {limit:,}" for name, (got, limit) in over.items())
        why = (f"finalize kept units that removed channels feed as constants ({report.retained}); lower the budget or "
               "use a method that prunes these groups together" if report.retained else
               f"method {prepared.method.name!r} decided more than the budget allows (its decide must meet "
               "ctx.targets, e.g. through fxprune.budget.allocate)")
        raise BudgetError(f"the finalized model misses its budget: {said} (measured on the finalized module); {why}")
    return model


LATENCY_TRIES = 3  # re-decisions on a tightened predictor target after a measured miss


def _meet_latency(prepared: Prepared, model: fx.GraphModule, data: Any, rtol: float,
                  compensate: bool | dict[str, Any], progress: bool) -> fx.GraphModule:
    """Measure the finalized model against the dense one on the budget's backend; while it misses
    the target by more than the measurement's noise, scale the predictor's limit by
    target / measured and decide again (at most ``LATENCY_TRIES`` times). Records every attempt
    in ``prepared.latency``; ``BudgetError`` if the last still misses."""
    from fxprune.backends import compare_latency

    budget, targets = prepared.budget, prepared.targets
    backend = targets.backend
    inputs = tuple(t[:1] for t in prepared.ctx.example_inputs)
    predictor = prepared.latency_model.predictor
    attempts = []
    for attempt in range(LATENCY_TRIES + 1):
        cmp = compare_latency(prepared.ctx.traced, model, backend=backend, example_inputs=inputs, rounds=5, repeats=10)
        dense_ms, measured_ms = cmp.dense.median_ms, cmp.dense.median_ms / cmp.speedup
        target_ms = budget.latency_ms if budget.latency_ms is not None else budget.latency * dense_ms
        noise = max(0.02, (cmp.speedup_max - cmp.speedup_min) / (2 * cmp.speedup))
        limit_us = prepared.targets.limits["latency"]
        attempts.append({"limit_us": limit_us, "predicted_ms": predictor.predict_ms(prepared.decision.keep) *
                         dense_ms / predictor.dense_ms, "measured_ms": measured_ms, "dense_ms": dense_ms,
                         "noise": noise, "macs": prepared.measured["macs"]})
        prepared.latency = {"backend": backend, "target_ms": target_ms, "dense_ms": dense_ms,
                            "measured_ms": measured_ms, "predicted_ms": attempts[-1]["predicted_ms"],
                            "ratio": measured_ms / dense_ms, "met": measured_ms <= target_ms * (1 + noise),
                            "predictor_mape": prepared.latency_model.test_mape, "attempts": attempts}
        if prepared.latency["met"]:
            return model
        if attempt == LATENCY_TRIES:
            break
        tighter = int(limit_us * target_ms / measured_ms)
        if tighter < targets.floor["latency"]:
            break
        prepared.ctx.targets = replace(prepared.targets, limits={**prepared.targets.limits, "latency": tighter})
        model = _finalize_once(prepared, data, rtol, compensate, progress)
    raise BudgetError(f"the pruned model measures {measured_ms:.3f} ms on {backend}, above the latency target "
                      f"{target_ms:.3f} ms (+{noise:.0%} noise) after {len(attempts)} decisions on a tightened latency "
                      f"predictor (held-out error {prepared.latency_model.test_mape:.1f}%); lower the budget, or "
                      "rebuild the predictor with more samples (fxprune latency-model)")


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
    method_report: dict[str, Any] = field(default_factory=dict)
    compensation: dict[str, Any] | None = None
    leaves: dict[str, str] = field(default_factory=dict)  # submodules tracing kept opaque, and why
    sparsity: dict[str, Any] | None = None  # a weight budget: zeros per layer and overall, non-zero MACs, bytes
    latency_budget: dict[str, Any] | None = None  # a latency budget: target, predicted, measured, the predictor
    bn_recalibration: dict[str, int] | None = None  # BatchNorm re-estimation after finalize: norms, batches read

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def to_html(self) -> str:
        """One self-contained page with the summary and plots (``fxprune.flow.html``)."""
        from fxprune.flow.html import render

        return render(json.loads(self.to_json()), self.summary())

    def summary(self) -> str:
        d, p = self.dense, self.pruned
        lines = [
            f"method {self.method}, budget {self.budget}",
            f"MACs/example  {d['flops']:>14,} -> {p['flops']:>14,}  ({p['flops'] / d['flops']:.1%})",
            f"parameters    {d['params']:>14,} -> {p['params']:>14,}  ({p['params'] / d['params']:.1%})",
            f"groups pruned {sum(g['kept'] < g['size'] for g in self.groups)} of {len(self.groups)}",
            f"finalize check: max relative difference {self.equivalence.get('max_rel_diff', float('nan')):.2e}",
        ]
        if self.compensation:
            c = self.compensation
            fitted = sum(v["status"] == "fitted" for v in c["layers"].values())
            lines.append(f"compensation: {fitted} of {len(c['layers'])} consumer layers refitted, calibration output "
                         f"error {c['output_error']['without']:.3g} -> {c['output_error']['with']:.3g}"
                         + ("" if c["used"] else " (worse: not applied)"))
        if self.sparsity:
            z = self.sparsity
            lines.append(f"weights: {z['overall']:.1%} zero over {z['target']['prunable_weights']:,} prunable "
                         f"(target {z['target']['nm'] or z['target']['sparsity']}), non-zero MACs "
                         f"{z['nonzero_macs'] / z['dense_macs']:.1%} of the layers' {z['dense_macs']:,}; stored "
                         f"{z['bytes_dense'] / 1e6:.2f} MB dense, {z['bytes_sparse'] / 1e6:.2f} MB sparse"
                         + (f"; no non-zero weight left in {', '.join(z['empty'])}" if z.get("empty") else ""))
        if self.latency_budget:
            lb = self.latency_budget
            lines.append(f"latency budget ({lb['backend']}): target {lb['target_ms']:.3f} ms, predicted "
                         f"{lb['predicted_ms']:.3f} ms, measured {lb['measured_ms']:.3f} ms = {lb['ratio']:.1%} of dense "
                         f"{lb['dense_ms']:.3f} ms ({len(lb['attempts'])} decision(s); predictor error "
                         f"{lb['predictor_mape']:.1f}%)")
        if self.bn_recalibration:
            b = self.bn_recalibration
            lines.append(f"BatchNorm re-estimation: {b['norms']} norms on {b['batches']} calibration batches")
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


def _accuracy(model: torch.nn.Module, loader, output: Callable[[Any], Any] | None = None) -> float | None:
    if loader is None:
        return None
    from fxprune.train import evaluate

    return evaluate(model, loader, output=output)


def _without_hooks(model: torch.nn.Module) -> torch.nn.Module:
    """A copy whose hooks are gone: a user's hook must not run on fxprune's work (the traced model
    has none either)."""
    work = copy_module(model)
    checks.drop_hooks(work)
    return work


def compile(model: torch.nn.Module, method: str | Method = "gdp", budget: Budget | None = None,
            example_inputs: Sequence[Any] = (), train_loader=None, eval_loader=None, epochs: int = 0,
            finetune_epochs: int = 0, lr: float = 0.05, gate_lr: float = 0.2,
            weight_decay: float = 5e-4, progress: bool = True, validate: Sequence[str] = (),
            method_options: dict[str, Any] | None = None, calib_loader=None,
            loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
            output: Callable[[Any], Any] | None = None, compensate: bool | dict[str, Any] = False,
            finetune_lop: bool | dict[str, Any] = False, latency_model: dict[str, Any] | None = None,
            bn_recalibration: int = 0) -> CompileResult:
    """Prune ``model`` to ``budget`` with ``method``; the user's model is left untouched.

    Phases: prepare (trace, analyze, the method's gates if any); train ``epochs`` with the
    method's hooks (ordinary training for methods without any); decide (``calib_loader``, else
    ``train_loader``, is the data of data-driven methods) and finalize; fine-tune the pruned
    model ``finetune_epochs``; optionally measure latency (``validate=["onnxruntime"]``).
    For a model that returns a tuple or dict, ``output`` picks the logits (``lambda out:
    out[0]``) and/or ``loss_fn(outputs, labels)`` replaces cross-entropy. ``compensate=True``
    refits the consumers of removed channels on the calibration data before finalize (see
    ``finalize``): pruning without retraining. ``finetune_lop=True`` (or a dict of
    ``fxprune.passes.lop.expand`` options) fine-tunes a linearly over-parameterized copy (each
    conv/linear a product of two) and collapses it back to the pruned shape, checked. Under a
    latency budget, ``latency_model`` passes options to the predictor's build (see ``prepare``);
    the pruned model is measured on the budget's backend and ``report.latency_budget`` holds the
    target, the prediction and the measurement. ``bn_recalibration=N`` re-estimates the pruned
    model's BatchNorm statistics on N calibration batches after finalize (see ``finalize``);
    fine-tuning starts from it, ``report.accuracy`` has ``pruned`` (raw) and ``pruned_bn``
    (re-estimated) and ``report.bn_recalibration`` the norms and batches read.

    Everything that can be checked is checked before the long work: the arguments, the
    backends named in ``validate`` (``BackendUnavailable``), the model and inputs (see
    ``prepare``); every batch as it is used (``fxprune.train``). Raises ``ConfigError``,
    ``TraceError``, ``BudgetError`` (also when the finalized model, measured, misses the
    budget), ``EquivalenceError``, ``BackendUnavailable``.
    """
    from fxprune.backends import require_backend
    from fxprune.train import train

    seconds: dict[str, float] = {}
    t = time.perf_counter()
    _check_budget(budget, "fxprune.compile")
    model = checks.model(model, "fxprune.compile")
    for name, value in (("epochs", epochs), ("finetune_epochs", finetune_epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"fxprune.compile: {name} must be an int >= 0, got {value!r}")
    m = get_method(method, **dict(method_options or {}))
    if m.needs_training and (train_loader is None or epochs <= 0):
        raise ConfigError(f"method {m.name!r} learns its decision: pass train_loader and epochs > 0")
    if (epochs > 0 or finetune_epochs > 0) and train_loader is None:
        raise ConfigError(f"epochs={epochs} and finetune_epochs={finetune_epochs} need a train_loader")
    calib = calib_loader if calib_loader is not None else train_loader
    if compensate and calib is None:
        raise ConfigError("compensate=True refits layers on calibration data: pass calib_loader=... (or train_loader)")
    _check_bn_recalibration(bn_recalibration, calib, "fxprune.compile", "calib_loader=... (or train_loader)")
    if finetune_lop and budget.weights:
        raise ConfigError("finetune_lop=True multiplies each layer out of two dense factors, which would fill a sparse "
                          "model's zeros; fine-tune a sparsity budget's model without it")
    if finetune_lop and finetune_epochs <= 0:
        raise ConfigError("finetune_lop=True over-parameterizes the fine-tuning: pass finetune_epochs > 0")
    validate = [validate] if isinstance(validate, str) else list(validate)
    for backend in validate:
        require_backend(backend)
    total = epochs * len(train_loader) if train_loader is not None and epochs > 0 else None
    prepared = prepare(model, m, budget, example_inputs, total_steps=total, progress=progress,
                       latency_model=latency_model)
    prepared.ctx.output, prepared.ctx.task_loss = output, loss_fn
    example_inputs = prepared.ctx.example_inputs
    seconds["prepare"] = time.perf_counter() - t
    acc = {"input": _accuracy(_without_hooks(model), eval_loader, output) if eval_loader is not None else None}
    logs: list[dict[str, Any]] = []
    fit = dict(lr=lr, weight_decay=weight_decay, loss_fn=loss_fn, output=output, example_inputs=example_inputs,
               eval_loader=eval_loader, progress=progress)
    if epochs > 0:
        t = time.perf_counter()
        own = prepared.method_parameters()
        groups = [{"params": own, "lr": gate_lr, "weight_decay": 0.0}] if own else None
        ctx = prepared.ctx
        overrides = {hook: getattr(type(m), hook) is not getattr(Method, hook)
                     for hook in ("loss", "after_backward", "lr_factor")}
        for e in train(prepared.module, train_loader, epochs, params=prepared.model_parameters(),
                       extra_param_groups=groups, extra_loss=prepared.loss if overrides["loss"] else None,
                       after_backward=prepared.after_backward if overrides["after_backward"] else None,
                       on_step=lambda s: prepared.step(), on_optimizer=lambda opt: setattr(ctx, "optimizer", opt),
                       lr_factor=prepared.lr_factor if overrides["lr_factor"] else None,
                       train_step=(lambda batch, opt: m.train_step(ctx, batch, opt)) if m.train_step else None,
                       desc=f"{m.name} train", epoch_metrics=lambda: m.schedule(ctx), **fit):
            logs.append({"phase": "train", **asdict(e)})
        seconds["train"] = time.perf_counter() - t
        acc["gated"] = _accuracy(prepared.module, eval_loader, output)
    t = time.perf_counter()
    pruned = finalize(prepared, data=calib, compensate=compensate, progress=progress)
    seconds["finalize"] = time.perf_counter() - t
    acc["pruned"] = _accuracy(pruned, eval_loader, output)
    if bn_recalibration:
        t = time.perf_counter()
        _recalibrate(prepared, pruned, calib, bn_recalibration)
        seconds["bn_recalibration"] = time.perf_counter() - t
        acc["pruned_bn"] = _accuracy(pruned, eval_loader, output)
    if finetune_epochs > 0:
        t = time.perf_counter()
        work = lop.expand(pruned, **(finetune_lop if isinstance(finetune_lop, dict) else {})) if finetune_lop else pruned
        frozen = _FrozenZeros(work, prepared.targets.weights) if prepared.sparsity is not None else None
        for e in train(work, train_loader, finetune_epochs, desc="fine-tune" + (" (LOP)" if finetune_lop else ""),
                       after_backward=frozen.mask_grads if frozen else None,
                       on_step=frozen.rezero if frozen else None, **fit):
            logs.append({"phase": "finetune", **asdict(e)})
        if finetune_lop:
            pruned = _collapsed(work, example_inputs)
        if frozen is not None:  # the fine-tuned weights are what the report and the budget check read
            _count_zeros(prepared, pruned)
        seconds["finetune"] = time.perf_counter() - t
        acc["finetuned"] = _accuracy(pruned, eval_loader, output)
    pruned.eval()
    report = _report(model, pruned, prepared, m, budget, acc, seconds, logs)
    if validate:
        t = time.perf_counter()
        report.latency = _validate(model, pruned, example_inputs, validate)
        seconds["validate"] = time.perf_counter() - t
    return CompileResult(pruned, report, prepared)


def _count_zeros(prepared: Prepared, model: torch.nn.Module) -> None:
    """A weight budget's zeros counted on ``model`` into ``prepared.sparsity``; ``BudgetError`` if short."""
    weights = prepared.targets.weights
    prepared.sparsity = sp.measure(model, weights, prepared.cost.weight_macs())
    sp.check(prepared.sparsity, weights, model)


class _FrozenZeros:
    """Fine-tuning a sparse model: the zero weights of a weight budget get no gradient and stay 0
    (momentum and weight decay cannot move them either: they are re-zeroed after every step)."""

    def __init__(self, model: torch.nn.Module, weights: sp.WeightTargets) -> None:
        params = dict(model.named_parameters())
        self.pairs = [(params[n], params[n].detach() != 0) for n in weights.sizes]

    def mask_grads(self) -> None:
        for p, keep in self.pairs:
            if p.grad is not None:
                p.grad.mul_(keep.to(p.grad.dtype))

    def rezero(self, step: int) -> None:
        with torch.no_grad():
            for p, keep in self.pairs:
                p.mul_(keep.to(p.dtype))


def _collapsed(expanded: torch.nn.Module, example_inputs: tuple[Any, ...]) -> fx.GraphModule:
    """The LOP-trained model multiplied back into the pruned shape, checked against the expanded one."""
    from fxprune.passes.verify import compare_outputs

    collapsed = lop.collapse(expanded).eval()
    expanded.eval()
    with torch.no_grad():
        _, rel = compare_outputs(collapsed(*example_inputs), expanded(*example_inputs))
    if not rel <= 1e-4:
        raise EquivalenceError(f"the LOP-trained model, collapsed back into the pruned shape, differs from it by "
                               f"{rel:.3g} (relative); this is a bug in fxprune.passes.lop, please report it")
    return collapsed


def _report(model, pruned, prepared: Prepared, m: Method, budget: Budget, acc, seconds, logs) -> CompileReport:
    fin = prepared.finalize_report
    dense_params = sum(p.numel() for p in model.parameters())
    return CompileReport(
        method=m.name,
        method_options=m.describe(),
        method_report=m.report(prepared.ctx),
        compensation=asdict(prepared.compensation) if prepared.compensation is not None else None,
        sparsity=asdict(prepared.sparsity) if prepared.sparsity is not None else None,
        latency_budget=dict(prepared.latency, predictor=prepared.latency_model.to_dict()) if prepared.latency else None,
        leaves=dict(prepared.ctx.leaf_modules),
        bn_recalibration=asdict(prepared.bn_stats) if prepared.bn_stats is not None else None,
        budget=budget.to_dict(),
        flops_unit="multiply-accumulates (MACs) of conv and linear layers per example",
        dense={"flops": prepared.targets.dense_macs, "params": dense_params},
        pruned={"flops": prepared.measured["macs"], "params": prepared.measured["params"]},
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


def _validate(dense, pruned, example_inputs, backends: list[str]) -> dict[str, Any]:
    from fxprune.backends import compare_latency

    dense = _without_hooks(dense).eval()  # compare_latency copies it again per backend: this copy only drops hooks
    results = {b: compare_latency(dense, pruned, backend=b, example_inputs=tuple(example_inputs)).to_dict()
               for b in backends}
    return results[backends[0]] if len(results) == 1 else {"backends": results, **results[backends[0]]}
