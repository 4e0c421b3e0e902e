"""Latency measurement that can be trusted on a shared machine.

Pruning is only worth something if the smaller model is faster where it runs, so we
measure rather than trust FLOPs. On CPU at one thread we time per-thread CPU time
(``time.thread_time_ns``): with one intra-op thread both ONNX Runtime and PyTorch run
the whole inference on the calling thread, and CPU time is not inflated when other
processes steal the core. Spinning is off so that idle worker threads do not burn CPU.
``compare_latency`` interleaves the two models in rounds so that slow drift of the
machine (thermal, neighbours) hits both equally.
"""
from __future__ import annotations

import contextlib
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from fxprune.errors import BackendUnavailable, ConfigError

from ._common import as_input_tuple, eval_copy, with_batch

BACKENDS = ("onnxruntime", "torch", "torch-cuda", "tensorrt")


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


def cpu_name() -> str:
    """CPU model from /proc/cpuinfo (Linux), else whatever platform knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"torch": torch.__version__, "onnxruntime": None}
    with contextlib.suppress(Exception):
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    return out


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Set torch's intra-op threads for the block and restore them afterwards."""
    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def require_backend(backend: str) -> None:
    """Check before any work that ``backend`` is one of ``BACKENDS`` and runs here.

    Raises ``ConfigError`` for an unknown name, ``BackendUnavailable`` saying what is missing."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ConfigError(f"unknown latency backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "torch-cuda":
        require_cuda(backend)
    elif backend == "tensorrt":
        from .tensorrt import require_tensorrt

        require_tensorrt()


def require_cuda(backend: str) -> None:
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise BackendUnavailable(
            f"backend {backend!r} needs a CUDA GPU, but torch.cuda.is_available() is False "
            f"(torch {torch.__version__} is {build}); run on a machine with an NVIDIA GPU and "
            "driver and a CUDA-enabled PyTorch build")


class _Bench:
    """One prepared model: `once()` runs one timed inference and returns its milliseconds."""

    def __init__(self, step: Callable[[], None], timer: str, settings: dict[str, Any],
                 cuda_stream: Any = None, cleanup: Callable[[], None] | None = None):
        self.step, self.timer, self.settings = step, timer, settings
        self._stream, self._cleanup = cuda_stream, cleanup

    def once(self) -> float:
        if self.timer == "cuda-events":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record(self._stream)
            self.step()
            end.record(self._stream)
            end.synchronize()
            return float(start.elapsed_time(end))
        clock = time.thread_time_ns if self.timer == "thread_time_ns" else time.perf_counter_ns
        t0 = clock()
        self.step()
        return (clock() - t0) / 1e6

    def run(self, n: int) -> list[float]:
        return [self.once() for _ in range(n)]

    def close(self) -> None:
        if self._cleanup:
            self._cleanup()


def _make_inputs(example_inputs: Any, input_shape: Any, batch_size: int,
                 onnx_inputs: list | None = None) -> tuple[torch.Tensor, ...]:
    """Inputs at `batch_size`: from example_inputs, a per-sample input_shape, or the ONNX file."""
    if example_inputs is not None:
        inputs = as_input_tuple(example_inputs)
        return inputs if inputs[0].shape[0] == batch_size else with_batch(inputs, batch_size)
    if input_shape is not None:
        g = torch.Generator().manual_seed(0)
        return (torch.randn(batch_size, *tuple(input_shape), generator=g),)
    if onnx_inputs:
        shapes = []
        for meta in onnx_inputs:
            dims = [batch_size if (i == 0 and not isinstance(d, int)) else d
                    for i, d in enumerate(meta.shape)]
            if not all(isinstance(d, int) for d in dims):
                raise ConfigError(f"ONNX input {meta.name!r} has symbolic dims {meta.shape}; "
                                  "pass example_inputs or input_shape")
            shapes.append(dims)
        return tuple(torch.randn(*s) for s in shapes)
    raise ConfigError("pass example_inputs=(tensor, ...) or input_shape=(C, H, W) "
                      "(one sample, without the batch dim)")


def _prepare(model_or_path: nn.Module | str | os.PathLike, backend: str, example_inputs: Any,
             input_shape: Any, batch_size: int, threads: int, compile: bool,
             fp16: bool = False) -> _Bench:
    """Build the runnable thing for one backend (exports / engines go to a temp dir)."""
    require_backend(backend)
    is_path = isinstance(model_or_path, (str, os.PathLike))
    settings: dict[str, Any] = {"backend": backend, "batch_size": batch_size, "threads": threads,
                                "compile": compile, **{f"{k}_version": v for k, v in _versions().items()}}
    cpu_timer = "thread_time_ns" if threads == 1 else "perf_counter_ns"
    tmp = tempfile.TemporaryDirectory(prefix="fxprune-latency-")
    try:
        if backend == "onnxruntime":
            return _prepare_ort(model_or_path, is_path, example_inputs, input_shape, batch_size,
                                threads, settings, cpu_timer, tmp)
        if backend == "tensorrt":
            return _prepare_trt(model_or_path, is_path, example_inputs, input_shape, batch_size,
                                fp16, settings, tmp)
        if is_path:
            raise ConfigError(f"backend {backend!r} needs an nn.Module, got the path {model_or_path}")
        device = "cuda" if backend == "torch-cuda" else "cpu"
        model = eval_copy(model_or_path).to(device)
        runnable = torch.compile(model) if compile else model
        inputs = tuple(t.to(device) for t in _make_inputs(example_inputs, input_shape, batch_size))

        def step() -> None:
            with torch.inference_mode():
                runnable(*inputs)

        if device == "cuda":
            settings["cudnn_benchmark"] = bool(torch.backends.cudnn.benchmark)
        settings.update(device=torch.cuda.get_device_name() if device == "cuda" else cpu_name(),
                        timer="cuda-events" if device == "cuda" else cpu_timer,
                        input_shapes=[list(t.shape) for t in inputs], model=type(model_or_path).__name__)
        tmp.cleanup()
        return _Bench(step, settings["timer"], settings,
                      cuda_stream=torch.cuda.current_stream() if device == "cuda" else None)
    except BaseException:
        tmp.cleanup()
        raise


def _prepare_ort(model_or_path, is_path, example_inputs, input_shape, batch_size, threads,
                 settings, cpu_timer, tmp) -> _Bench:
    from .onnx import export_onnx, ort_session

    if is_path:
        path = Path(model_or_path)
        settings["model"] = str(path)
    else:
        inputs = _make_inputs(example_inputs, input_shape, 1)
        path = Path(tmp.name) / "model.onnx"
        export_onnx(model_or_path, path, inputs, dynamic_batch=True)
        settings["model"] = type(model_or_path).__name__
    session = ort_session(path, threads=max(threads, 1), spinning=False)
    meta = session.get_inputs()
    inputs = _make_inputs(example_inputs, input_shape, batch_size, onnx_inputs=meta)
    feeds = {m.name: t.numpy() for m, t in zip(meta, inputs)}
    settings.update(device=cpu_name(), timer=cpu_timer, provider="CPUExecutionProvider",
                    input_shapes=[list(t.shape) for t in inputs])
    return _Bench(lambda: session.run(None, feeds), cpu_timer, settings, cleanup=tmp.cleanup)


def _prepare_trt(model_or_path, is_path, example_inputs, input_shape, batch_size, fp16,
                 settings, tmp) -> _Bench:
    from .tensorrt import TrtRunner, build_engine, export_tensorrt, require_tensorrt

    trt = require_tensorrt()
    path = Path(model_or_path) if is_path else None
    engine = Path(tmp.name) / "model.engine"
    if path is not None and path.suffix == ".onnx":
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        inits = {i.name for i in proto.graph.initializer}
        metas = [i for i in proto.graph.input if i.name not in inits]
        shapes = {}
        for m in metas:
            dims = [d.dim_value if d.HasField("dim_value") else batch_size
                    for d in m.type.tensor_type.shape.dim]
            shapes[m.name] = dims
        weak_fp16 = hasattr(trt.BuilderFlag, "FP16")
        if fp16 and not weak_fp16 and metas[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT16:
            raise ConfigError(f"TensorRT {trt.__version__} has no FP16 builder flag (strong typing "
                              f"only) and {path} is FP32: pass the nn.Module (fxprune then exports "
                              "an FP16 ONNX model) or an FP16 ONNX file")
        build_engine(path, engine, shapes, fp16_flag=fp16 and weak_fp16,
                     strongly_typed=fp16 and not weak_fp16, max_batch=max(64, batch_size))
    elif path is not None:
        engine = path  # a serialized engine (.engine / .plan)
    else:
        sample = _make_inputs(example_inputs, input_shape, 1)
        export_tensorrt(model_or_path, engine, sample, fp16=fp16, max_batch=max(64, batch_size))
    runner = TrtRunner(engine)
    if path is not None and example_inputs is None and input_shape is None:
        shapes_ = [list(runner.engine.get_tensor_shape(n)) for n in runner.input_names]
        inputs = tuple(torch.randn(*[batch_size if d < 0 else d for d in s]) for s in shapes_)
    else:
        inputs = _make_inputs(example_inputs, input_shape, batch_size)
    inputs = tuple(t.to("cuda", runner.input_dtype(n)) for n, t in zip(runner.input_names, inputs))
    settings.update(device=torch.cuda.get_device_name(), timer="cuda-events", fp16=fp16,
                    tensorrt_version=trt.__version__, input_shapes=[list(t.shape) for t in inputs],
                    model=str(path) if path else type(model_or_path).__name__)
    return _Bench(lambda: runner.enqueue(*inputs), "cuda-events", settings,
                  cuda_stream=runner.stream, cleanup=tmp.cleanup)


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
        bench = _prepare(model_or_path, backend, example_inputs, input_shape, batch_size,
                         threads, compile, fp16)
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
            for m in (dense, pruned):
                benches.append(_prepare(m, backend, example_inputs, input_shape, batch_size,
                                        threads, compile, fp16))
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
