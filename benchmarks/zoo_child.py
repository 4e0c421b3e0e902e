"""One model's zoo measurements, run by ``zoo.py`` in a fresh process per model.

A fresh process because peak RSS cannot leak between models and because the parent can kill it
(memory watchdog) without losing what was measured so far: every finding is printed at once as
a JSON line, and the parent merges the lines into the model's row.

    python benchmarks/zoo_child.py '{"model": "resnet50", "size": 224, "repeats": 3, "tp": true}'

Torch runs on one thread (``torch.set_num_threads(1)``; the parent also sets OMP_NUM_THREADS=1).
"""
from __future__ import annotations

import copy
import ctypes
import gc
import json
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torchvision

import fxprune
from fxprune.models import calibrate_batchnorm
from fxprune.passes import FinalizeReport, finalize, insert_gates
from zoo_common import input_size, proc_status

SEGMENTATION = set(torchvision.models.list_models(module=torchvision.models.segmentation))


# ---- output to the parent --------------------------------------------------------------------

def emit(**fields: Any) -> None:
    """One JSON line for the parent to merge into the row (flushed: the parent may kill us)."""
    print(json.dumps(fields), flush=True)


def short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text.splitlines()[0][:400]


# ---- memory: Linux /proc ---------------------------------------------------------------------

def reset_peak() -> bool:
    """Reset VmHWM (peak RSS) to the current RSS: writing 5 to /proc/self/clear_refs (Linux >= 4.0).

    This is what lets one process measure the peak of each phase separately."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def settle() -> int:
    """Collect garbage and hand free heap pages back to the OS, then return the RSS in bytes.

    Without ``malloc_trim`` glibc keeps freed blocks of earlier forwards resident, which a later
    phase then reuses without its RSS growing: the baseline would hide part of the phase's cost."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return proc_status().get("VmRSS", 0)


class PhaseMemory:
    """Per-phase peak and end RSS above ``baseline`` (bytes): VmHWM is reset as each phase starts."""

    def __init__(self, baseline: int):
        self.baseline = baseline
        self.peak: dict[str, int] = {}
        self.held: dict[str, int] = {}

    def start(self, phase: str) -> None:
        reset_peak()
        emit(phase=phase)

    def end(self, phase: str) -> None:
        status = proc_status()
        self.peak[phase] = status["VmHWM"] - self.baseline
        self.held[phase] = status["VmRSS"] - self.baseline
        emit(**{f"mem_peak_{phase}": self.peak[phase], f"mem_held_{phase}": self.held[phase]})


# ---- the model ------------------------------------------------------------------------------

def build(name: str, size: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name in SEGMENTATION:
        model = torchvision.models.get_model(name, weights=None, weights_backbone=None)
    else:
        model = torchvision.models.get_model(name, weights=None)
    model.eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    # statistics of the example input and 3 random images: few-sample statistics of deep 2x2 maps
    # otherwise make some models (efficientnet_b3..b6 at 64x64) numerically chaotic in float32
    noise = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(3))
    calibrate_batchnorm(model, torch.cat([x, noise]))
    return model, x


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for n, p in m.named_parameters() if "fxprune_gates" not in n)


def leaves(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in leaves(v)]
    return []


def rel_diff(a: Any, b: Any) -> float:
    worst = 0.0
    for x, y in zip(leaves(a), leaves(b)):
        d = (x.double() - y.double()).abs().max().item()
        worst = max(worst, d / max(y.double().abs().max().item(), 1e-12))
    return worst


@dataclass(frozen=True)
class Took:
    """How long a block took: process CPU seconds, which the tables use (on one thread that is the
    wall time of an idle machine, and other processes on a shared machine do not inflate it), and
    wall seconds, kept to show how far the two are apart."""

    cpu: float
    wall: float


def stopwatch() -> Callable[[], Took]:
    cpu, wall = time.process_time(), time.perf_counter()
    return lambda: Took(time.process_time() - cpu, time.perf_counter() - wall)


def medians(took: list[Took]) -> tuple[float, float]:
    return statistics.median(t.cpu for t in took), statistics.median(t.wall for t in took)


def forward_times(model: nn.Module, x: torch.Tensor, repeats: int) -> list[Took]:
    """Eager no_grad forwards of the dense model after one warm-up forward."""
    with torch.no_grad():
        model(x)
        times = []
        for _ in range(repeats):
            took = stopwatch()
            model(x)
            times.append(took())
    return times


def half_gates(gates: dict, seed: int = 0) -> None:
    """The decision the benchmark finalizes: half of every group at exactly 0, the rest random."""
    rng = np.random.default_rng(seed)
    for gid in sorted(gates):
        w = gates[gid].weight
        v = rng.uniform(0.25, 1.75, w.numel())
        v[rng.permutation(w.numel())[: w.numel() // 2]] = 0.0
        with torch.no_grad():
            w.copy_(torch.as_tensor(v, dtype=w.dtype))


# ---- the fxprune pipeline ---------------------------------------------------------------------

@dataclass
class Pipeline:
    """What a user script holds after trace -> analyze -> insert_gates -> finalize, and the times."""

    took: dict[str, Took] = field(default_factory=dict)
    gm: fx.GraphModule | None = None
    cg: Any = None
    gated: fx.GraphModule | None = None
    fin: fx.GraphModule | None = None
    report: FinalizeReport = field(default_factory=FinalizeReport)
    equivalence_error: str | None = None


def run_pipeline(model: nn.Module, x: torch.Tensor, memory: PhaseMemory | None = None) -> Pipeline:
    """The whole pipeline with each phase timed on its own (memory probes outside the timings).

    Raises TraceError and any crash; an EquivalenceError from finalize's check is recorded instead
    (finalize did all its work, so its time is still meaningful)."""
    p = Pipeline()

    def timed(phase: str, fn: Callable[[], Any]) -> Any:
        if memory:
            memory.start(phase)
        took = stopwatch()
        try:
            return fn()
        finally:
            p.took[phase] = took()
            if memory:
                memory.end(phase)

    p.gm = timed("trace", lambda: fxprune.trace(model, (x,)))
    p.cg = timed("analyze", lambda: fxprune.analyze(p.gm))
    if not p.cg.prunable_groups:
        return p
    p.gated, gates = timed("insert_gates", lambda: insert_gates(p.gm, p.cg))
    half_gates(gates)
    try:
        p.fin = timed("finalize", lambda: finalize(p.gated, p.cg, report=p.report))
    except fxprune.EquivalenceError as exc:
        p.equivalence_error = short(exc)
    return p


def spine_fields(p: Pipeline, x: torch.Tensor) -> dict[str, Any]:
    """What the pipeline found: groups, prunable share, leaves, and the finalized model's accuracy."""
    s = p.cg.summary()
    out: dict[str, Any] = dict(
        traced=True, leaf_modules=sorted(p.gm.meta.get("fxprune_leaf_modules", {})),
        groups=s["groups"], prunable_groups=s["prunable_groups"], channels=s["channels"],
        prunable_channels=s["prunable_channels"], prunable_channel_pct=100.0 * s["prunable_fraction"])
    if p.fin is not None:
        with torch.no_grad():
            out["rel_diff"] = rel_diff(p.fin(x), p.gated(x))
        out.update(report_rel_diff=p.report.max_rel_diff, params_after=n_params(p.fin),
                   removed_branches=len(p.report.removed_branches), retained_groups=len(p.report.retained))
    return out


def float64_check(model: nn.Module, x: torch.Tensor, gated: nn.Module) -> dict[str, float]:
    """After a float32 EquivalenceError: how far the float32 gated model is from its own float64
    twin (its conditioning), and the finalize difference when the whole pipeline runs in float64.
    Randomly initialised deep nets with random gates can amplify float32 rounding beyond 1e-4."""
    with torch.no_grad():
        noise = rel_diff(gated(x), copy.deepcopy(gated).double()(x.double()))
    model64, x64 = copy.deepcopy(model).double(), x.double()
    gm = fxprune.trace(model64, (x64,))
    cg = fxprune.analyze(gm)
    gated64, gates = insert_gates(gm, cg)
    half_gates(gates)
    fin = finalize(gated64, cg, check=False)
    with torch.no_grad():
        return {"fp32_noise": noise, "rel_diff_fp64": rel_diff(fin(x64), gated64(x64))}


# ---- Torch-Pruning --------------------------------------------------------------------------

def classifier(model: nn.Module) -> nn.Module:
    """The final classifier Torch-Pruning must not prune: the last Linear (else the last Conv2d)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return (linears or [m for m in model.modules() if isinstance(m, nn.Conv2d)])[-1]


def tp_prune(model: nn.Module, x: torch.Tensor) -> tuple[Took, nn.Module]:
    """Time of Torch-Pruning's ``MagnitudePruner(...).step()`` on a deep copy of ``model``.

    The pruner is built inside the timed region: its dependency-graph construction (a traced
    forward) is part of its cost, as fxprune's trace + analyze are. The copy is not timed."""
    import torch_pruning as tp

    pruned = copy.deepcopy(model)
    took = stopwatch()
    pruner = tp.pruner.MagnitudePruner(
        pruned, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5,
        ignored_layers=[classifier(pruned)])
    pruner.step()
    return took(), pruned


def tp_available() -> str | None:
    """None if torch_pruning imports, else why not (it is the benchmark's, not fxprune's, dependency)."""
    try:
        import torch_pruning  # noqa: F401
    except ImportError as exc:
        return short(exc)
    return None


# ---- one model -------------------------------------------------------------------------------

def measure_baseline(model: nn.Module, x: torch.Tensor, forward_repeats: int) -> int:
    """Forward time and one forward's activation peak; returns the model's settled RSS (bytes)."""
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    emit(params=n_params(model), param_bytes=param_bytes,
         buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()))
    forward_times(model, x, 0)  # warm-up
    before = settle()
    if reset_peak():
        with torch.no_grad():
            model(x)
        emit(mem_forward=proc_status()["VmHWM"] - before)
    forward_s, forward_wall_s = medians(forward_times(model, x, forward_repeats))
    emit(forward_s=forward_s, forward_wall_s=forward_wall_s)
    baseline = settle()
    emit(mem_model_rss=baseline)
    return baseline


def first_run(model: nn.Module, x: torch.Tensor, baseline: int) -> bool:
    """The first (cold) pipeline run, with per-phase memory; True if repeats are worth timing."""
    probe = PhaseMemory(baseline) if reset_peak() else None
    try:
        p = run_pipeline(model, x, probe)
    except fxprune.TraceError as exc:
        emit(traced=False, error=short(exc))
        return False
    if probe:  # everything the pipeline returned is still alive here
        emit(mem_pipeline_peak=max(probe.peak.values()), mem_pipeline_held=settle() - baseline)
    emit(phase="checks", cold_s={k: t.cpu for k, t in p.took.items()},
         cold_wall_s={k: t.wall for k, t in p.took.items()}, **spine_fields(p, x))
    if p.equivalence_error:
        emit(finalize_error=p.equivalence_error, **float64_check(model, x, p.gated))
    return p.gated is not None


def tp_first_run(model: nn.Module, x: torch.Tensor) -> bool:
    """Torch-Pruning's warm-up run: its peak RSS above the settled RSS (model copy included)."""
    emit(phase="torch_pruning")
    before = settle()
    measured = reset_peak()
    try:
        took, pruned = tp_prune(model, x)
    except Exception as exc:  # noqa: BLE001 - a benchmark records failures and goes on
        emit(tp_error=short(exc))
        return False
    if measured:
        emit(tp_mem_peak=proc_status()["VmHWM"] - before)
    emit(tp_cold_s=took.cpu, tp_params_after=n_params(pruned))
    return True


def first_call_extra(fin: nn.Module, x: torch.Tensor) -> Took:
    """What the finalized module's first call costs beyond a later one: writing and compiling its
    Python code, which finalize leaves to that first call (``fxprune/lazycode.py``); counted
    beside the pipeline, since a script that runs or exports the pruned model pays it."""
    with torch.no_grad():
        first = stopwatch()
        fin(x)
        a = first()
        later = stopwatch()
        fin(x)
        b = later()
    return Took(a.cpu - b.cpu, a.wall - b.wall)


def timed_repeats(model: nn.Module, x: torch.Tensor, repeats: int, with_tp: bool) -> None:
    """fxprune's pipeline, Torch-Pruning and 3 dense forwards interleaved, so that drift of a shared
    machine hits all three alike; the forward unit becomes the median of all forwards made."""
    emit(phase="timing")
    forwards: list[Took] = []
    runs: list[dict[str, Took]] = []
    tp_runs: list[Took] = []
    code: list[Took] = []
    for _ in range(repeats):
        forwards += forward_times(model, x, 3)
        gc.collect()
        p = run_pipeline(model, x)
        runs.append(p.took)
        if p.fin is not None:
            code.append(first_call_extra(p.fin, x))
        del p
        if with_tp:
            gc.collect()
            tp_runs.append(tp_prune(model, x)[0])
    totals = [Took(sum(t.cpu for t in r.values()), sum(t.wall for t in r.values())) for r in runs]
    (forward_s, forward_wall_s), (total_s, total_wall_s) = medians(forwards), medians(totals)
    emit(forward_s=forward_s, forward_wall_s=forward_wall_s, total_s=total_s, total_wall_s=total_wall_s,
         phase_s={ph: statistics.median(r[ph].cpu for r in runs) for ph in runs[0]},
         total_runs=[t.cpu for t in totals], total_wall_runs=[t.wall for t in totals])
    if code:
        emit(first_call_code_s=statistics.median(t.cpu for t in code))
    if tp_runs:
        tp_s, tp_wall_s = medians(tp_runs)
        emit(tp_s=tp_s, tp_wall_s=tp_wall_s, tp_runs=[t.cpu for t in tp_runs],
             tp_wall_runs=[t.wall for t in tp_runs])


def measure(job: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    size = input_size(job["model"], job["size"])
    emit(model=job["model"], input=[1, 3, size, size], threads=torch.get_num_threads(), phase="build")
    model, x = build(job["model"], size)
    baseline = measure_baseline(model, x, job.get("forward_repeats", 5))
    if not first_run(model, x, baseline):
        return
    with_tp = bool(job.get("tp"))
    if with_tp:
        why = tp_available()
        with_tp = why is None and tp_first_run(model, x)
        if why:
            emit(tp_error=why)
    if job.get("repeats", 0) > 0:
        timed_repeats(model, x, job["repeats"], with_tp)


def main() -> None:
    job = json.loads(sys.argv[1])
    try:
        measure(job)
    except Exception as exc:  # noqa: BLE001 - the parent records it and goes on
        emit(error=short(exc), traceback=traceback.format_exc(limit=5))
    emit(phase="done")


if __name__ == "__main__":
    main()
