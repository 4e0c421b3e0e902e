"""Latency measurement that can be trusted on a shared machine.

Pruning is only worth something if the smaller model is faster where it runs, so we
measure rather than trust FLOPs. Each backend's record (``registry``) names the runner that
times one inference (``runners``: CPU time at one thread, CUDA events on the GPU).
``compare_latency`` interleaves the two models in rounds so that slow drift of the
machine (thermal, neighbours) hits both equally.
"""
from __future__ import annotations

import os
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from torch import nn

from fxprune.errors import ConfigError

from .registry import require_backend
from .runners import Bench, RunSpec, torch_threads


@dataclass
class LatencyResult:
    """Latency of one model in milliseconds per inference (a batch is one inference)."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    repeats: int
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_samples(cls, samples_ms: list[float], settings: dict[str, Any]) -> "LatencyResult":
        p10, med, p90 = (float(v) for v in np.percentile(samples_ms, [10, 50, 90]))
        return cls(median_ms=med, p10_ms=p10, p90_ms=p90, mean_ms=float(np.mean(samples_ms)),
                   min_ms=float(min(samples_ms)), max_ms=float(max(samples_ms)),
                   repeats=len(samples_ms), settings=dict(settings))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable dict."""
        return asdict(self)


@dataclass
class LatencyComparison:
    """Dense vs pruned, measured in interleaved rounds; speedup = median of per-round ratios."""

    speedup: float
    speedup_min: float
    speedup_max: float
    ratios: list[float]
    rounds: int
    dense: LatencyResult
    pruned: LatencyResult
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable dict."""
        return {"speedup": self.speedup, "speedup_min": self.speedup_min,
                "speedup_max": self.speedup_max, "ratios": list(self.ratios),
                "rounds": self.rounds, "dense": self.dense.to_dict(),
                "pruned": self.pruned.to_dict(), "settings": dict(self.settings)}


def _prepare(model_or_path: nn.Module | str | os.PathLike, backend: str, spec: RunSpec) -> Bench:
    """The backend's runner on the model (checked first: unknown or unavailable backends raise)."""
    record = require_backend(backend)
    if isinstance(model_or_path, (str, os.PathLike)) and not record.takes_files:
        raise ConfigError(f"backend {backend!r} needs an nn.Module, got the path {model_or_path}")
    return record.runner(model_or_path, spec, backend)


def measure_latency(model_or_path: nn.Module | str | os.PathLike, backend: str = "onnxruntime",
                    example_inputs: Any = None, input_shape: tuple[int, ...] | None = None,
                    batch_size: int = 1, threads: int = 1, warmup: int = 10, repeats: int = 50,
                    compile: bool = False, fp16: bool = False) -> LatencyResult:
    """Median / p10 / p90 / mean latency (ms) of one inference at `batch_size`.

    `model_or_path`: an nn.Module, or an .onnx file (onnxruntime, tensorrt) or a serialized
    engine (tensorrt). `input_shape` is one sample's shape without the batch dim.
    `example_inputs` are resized to `batch_size` by repeating rows. `fp16` is TensorRT only.
    Raises ``ConfigError``, ``BackendUnavailable`` and ``ExportError`` as ``compare_latency``.
    """
    if repeats < 1:
        raise ConfigError(f"repeats must be >= 1, got {repeats}")
    with torch_threads(threads if backend == "torch" else 0):
        bench = _prepare(model_or_path, backend, RunSpec(example_inputs, input_shape, batch_size, threads,
                                                         compile, fp16))
        try:
            bench.run(warmup)
            samples = bench.run(repeats)
        finally:
            bench.close()
    bench.settings.update(warmup=warmup, repeats=repeats)
    return LatencyResult.from_samples(samples, bench.settings)


def compare_latency(dense: nn.Module | str | os.PathLike, pruned: nn.Module | str | os.PathLike,
                    backend: str = "onnxruntime", rounds: int = 7, *, example_inputs: Any = None,
                    input_shape: tuple[int, ...] | None = None, batch_size: int = 1,
                    threads: int = 1, warmup: int = 10, repeats: int = 10,
                    compile: bool = False, fp16: bool = False) -> LatencyComparison:
    """Speedup of `pruned` over `dense`, timed in interleaved rounds (dense, pruned, dense, ...).

    Each round runs `repeats` timed inferences per model (after `warmup` once at the start
    and two re-warming runs per later round, since the other model evicted the caches).
    speedup is the median over rounds of dense_median / pruned_median.
    Raises ``ConfigError`` (unknown backend, rounds or repeats < 1, no inputs),
    ``BackendUnavailable`` (CUDA / TensorRT missing), ``ExportError`` (a model that cannot be
    exported for ONNX Runtime or TensorRT).
    """
    if rounds < 1 or repeats < 1:
        raise ConfigError(f"rounds and repeats must be >= 1, got {rounds}, {repeats}")
    with torch_threads(threads if backend == "torch" else 0):
        benches = []
        try:
            spec = RunSpec(example_inputs, input_shape, batch_size, threads, compile, fp16)
            for m in (dense, pruned):
                benches.append(_prepare(m, backend, spec))
            for b in benches:
                b.run(warmup)
            samples: list[list[float]] = [[], []]
            ratios = []
            for r in range(rounds):
                medians = []
                for i, b in enumerate(benches):
                    if r:
                        b.run(2)
                    s = b.run(repeats)
                    samples[i].extend(s)
                    medians.append(statistics.median(s))
                ratios.append(medians[0] / medians[1])
        finally:
            for b in benches:
                b.close()
    for b in benches:
        b.settings.update(warmup=warmup, repeats=repeats, rounds=rounds)
    dres, pres = (LatencyResult.from_samples(s, b.settings) for s, b in zip(samples, benches))
    shared = {k: v for k, v in benches[0].settings.items() if k != "model"}
    return LatencyComparison(speedup=float(statistics.median(ratios)), speedup_min=float(min(ratios)),
                             speedup_max=float(max(ratios)), ratios=[float(x) for x in ratios],
                             rounds=rounds, dense=dres, pruned=pres, settings=shared)
