"""How each backend runs and times one model: a ``Bench`` whose ``once()`` is one timed inference.

On CPU at one thread we time per-thread CPU time (``time.thread_time_ns``): with one intra-op
thread both ONNX Runtime and PyTorch run the whole inference on the calling thread, and CPU time
is not inflated when other processes steal the core. Spinning is off so that idle worker threads
do not burn CPU. On CUDA we time with events on the model's stream. The backend records
(``fxprune.backends.registry``) point at the runner of each backend; nothing else dispatches on
backend names.
"""
from __future__ import annotations

import contextlib
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from fxprune.errors import BackendUnavailable, ConfigError

from ._common import as_input_tuple, eval_copy, with_batch


def cpu_name() -> str:
    """CPU model from /proc/cpuinfo (Linux), else whatever platform knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"torch": str(torch.__version__), "onnxruntime": None}
    with contextlib.suppress(Exception):
        import onnxruntime

        out["onnxruntime"] = str(onnxruntime.__version__)
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


def cuda_missing(backend: str) -> str | None:
    """Why ``backend`` cannot use CUDA here, or None."""
    if torch.cuda.is_available():
        return None
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return (f"backend {backend!r} needs a CUDA GPU, but torch.cuda.is_available() is False "
            f"(torch {torch.__version__} is {build}); run on a machine with an NVIDIA GPU and "
            "driver and a CUDA-enabled PyTorch build")


def require_cuda(backend: str) -> None:
    why = cuda_missing(backend)
    if why:
        raise BackendUnavailable(why)


class Bench:
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


@dataclass
class RunSpec:
    """What to run a model on: inputs (example tensors, or one sample's shape), batch, threads."""

    example_inputs: Any = None
    input_shape: tuple[int, ...] | None = None
    batch_size: int = 1
    threads: int = 1
    compile: bool = False
    fp16: bool = False

    @property
    def cpu_timer(self) -> str:
        return "thread_time_ns" if self.threads == 1 else "perf_counter_ns"

    def inputs(self, batch_size: int | None = None, onnx_inputs: list | None = None) -> tuple[torch.Tensor, ...]:
        """Inputs at the batch size: from example_inputs, a per-sample input_shape, or the ONNX file."""
        batch = self.batch_size if batch_size is None else batch_size
        if self.example_inputs is not None:
            inputs = as_input_tuple(self.example_inputs)
            return inputs if inputs[0].shape[0] == batch else with_batch(inputs, batch)
        if self.input_shape is not None:
            g = torch.Generator().manual_seed(0)
            return (torch.randn(batch, *tuple(self.input_shape), generator=g),)
        if onnx_inputs:
            shapes = []
            for meta in onnx_inputs:
                dims = [batch if (i == 0 and not isinstance(d, int)) else d for i, d in enumerate(meta.shape)]
                if not all(isinstance(d, int) for d in dims):
                    raise ConfigError(f"ONNX input {meta.name!r} has symbolic dims {meta.shape}; "
                                      "pass example_inputs or input_shape")
                shapes.append(dims)
            return tuple(torch.randn(*s) for s in shapes)
        raise ConfigError("pass example_inputs=(tensor, ...) or input_shape=(C, H, W) "
                          "(one sample, without the batch dim)")

    def settings(self, backend: str) -> dict[str, Any]:
        return {"backend": backend, "batch_size": self.batch_size, "threads": self.threads,
                "compile": self.compile, **{f"{k}_version": v for k, v in versions().items()}}


Runner = Callable[[Any, RunSpec, str], Bench]  # (module or file, spec, backend name) -> Bench


def run_onnxruntime(model_or_path: nn.Module | str | os.PathLike, spec: RunSpec, backend: str) -> Bench:
    """Export a module to a temporary ONNX file (or take an .onnx file) and time ORT's CPU session."""
    from .onnx import export_onnx, ort_session

    settings = spec.settings(backend)
    tmp = tempfile.TemporaryDirectory(prefix="fxprune-latency-")
    try:
        if isinstance(model_or_path, (str, os.PathLike)):
            path = Path(model_or_path)
            settings["model"] = str(path)
        else:
            path = Path(tmp.name) / "model.onnx"
            export_onnx(model_or_path, path, spec.inputs(1), dynamic_batch=True)
            settings["model"] = type(model_or_path).__name__
        session = ort_session(path, threads=max(spec.threads, 1), spinning=False)
        meta = session.get_inputs()
        inputs = spec.inputs(onnx_inputs=meta)
        feeds = {m.name: t.numpy() for m, t in zip(meta, inputs)}
    except BaseException:
        tmp.cleanup()
        raise
    settings.update(device=cpu_name(), timer=spec.cpu_timer, provider="CPUExecutionProvider",
                    input_shapes=[list(t.shape) for t in inputs])
    return Bench(lambda: session.run(None, feeds), spec.cpu_timer, settings, cleanup=tmp.cleanup)


def run_torch(model_or_path: nn.Module | str | os.PathLike, spec: RunSpec, backend: str) -> Bench:
    """Eager (or ``torch.compile``) PyTorch on the CPU or, for ``torch-cuda``, the GPU."""
    if isinstance(model_or_path, (str, os.PathLike)):
        raise ConfigError(f"backend {backend!r} needs an nn.Module, got the path {model_or_path}")
    settings = spec.settings(backend)
    device = "cuda" if backend == "torch-cuda" else "cpu"
    model = eval_copy(model_or_path).to(device)
    runnable = torch.compile(model) if spec.compile else model
    inputs = tuple(t.to(device) for t in spec.inputs())

    def step() -> None:
        with torch.inference_mode():
            runnable(*inputs)

    if device == "cuda":
        settings["cudnn_benchmark"] = bool(torch.backends.cudnn.benchmark)
    settings.update(device=torch.cuda.get_device_name() if device == "cuda" else cpu_name(),
                    timer="cuda-events" if device == "cuda" else spec.cpu_timer,
                    input_shapes=[list(t.shape) for t in inputs], model=type(model_or_path).__name__)
    return Bench(step, settings["timer"], settings,
                 cuda_stream=torch.cuda.current_stream() if device == "cuda" else None)


def run_tensorrt(model_or_path: nn.Module | str | os.PathLike, spec: RunSpec, backend: str) -> Bench:
    """Build an engine (from a module, an .onnx file, or take a serialized engine) and time it."""
    from .tensorrt import TrtRunner, export_tensorrt, require_tensorrt

    trt = require_tensorrt()
    settings = spec.settings(backend)
    tmp = tempfile.TemporaryDirectory(prefix="fxprune-latency-")
    try:
        path = Path(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else None
        engine = Path(tmp.name) / "model.engine"
        if path is not None and path.suffix == ".onnx":
            _engine_from_onnx(trt, path, engine, spec)
        elif path is not None:
            engine = path  # a serialized engine (.engine / .plan)
        else:
            export_tensorrt(model_or_path, engine, spec.inputs(1), fp16=spec.fp16, max_batch=max(64, spec.batch_size))
        runner = TrtRunner(engine)
        if path is not None and spec.example_inputs is None and spec.input_shape is None:
            shapes = [list(runner.engine.get_tensor_shape(n)) for n in runner.input_names]
            inputs = tuple(torch.randn(*[spec.batch_size if d < 0 else d for d in s]) for s in shapes)
        else:
            inputs = spec.inputs()
        inputs = tuple(t.to("cuda", runner.input_dtype(n)) for n, t in zip(runner.input_names, inputs))
    except BaseException:
        tmp.cleanup()
        raise
    settings.update(device=torch.cuda.get_device_name(), timer="cuda-events", fp16=spec.fp16,
                    tensorrt_version=trt.__version__, input_shapes=[list(t.shape) for t in inputs],
                    model=str(path) if path else type(model_or_path).__name__)
    return Bench(lambda: runner.enqueue(*inputs), "cuda-events", settings, cuda_stream=runner.stream,
                 cleanup=tmp.cleanup)


def _engine_from_onnx(trt: Any, path: Path, engine: Path, spec: RunSpec) -> None:
    import onnx

    from .tensorrt import build_engine

    proto = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in proto.graph.initializer}
    metas = [i for i in proto.graph.input if i.name not in inits]
    shapes = {m.name: [d.dim_value if d.HasField("dim_value") else spec.batch_size
                       for d in m.type.tensor_type.shape.dim] for m in metas}
    weak_fp16 = hasattr(trt.BuilderFlag, "FP16")
    if spec.fp16 and not weak_fp16 and metas[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT16:
        raise ConfigError(f"TensorRT {trt.__version__} has no FP16 builder flag (strong typing "
                          f"only) and {path} is FP32: pass the nn.Module (fxprune then exports "
                          "an FP16 ONNX model) or an FP16 ONNX file")
    build_engine(path, engine, shapes, fp16_flag=spec.fp16 and weak_fp16,
                 strongly_typed=spec.fp16 and not weak_fp16, max_batch=max(64, spec.batch_size))
