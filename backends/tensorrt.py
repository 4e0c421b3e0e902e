"""TensorRT engines built from the validated ONNX file, checked against PyTorch on the GPU.

Supports TensorRT 10.x and 11.x through the name-based tensor API (``num_io_tensors``,
``get_tensor_name``, ``set_tensor_address``, ``execute_async_v3``), which both share.
Version differences handled here:

- ``EXPLICIT_BATCH`` is only passed to ``create_network`` before 10.x (10.x ignores
  it and networks are always explicit-batch; it may disappear entirely).
- FP16 on 10.x: the weakly typed ``BuilderFlag.FP16`` on the FP32 ONNX file.
  11.x removed all weak-typing flags (strong typing is unconditional), so there the
  model itself is exported in FP16 and built as a strongly typed network.
  Which path is taken is decided by ``hasattr(trt.BuilderFlag, "FP16")``.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from fxprune.errors import BackendUnavailable, ExportError
from fxprune.files import atomic_path

from ._common import as_input_tuple, compare, eval_copy, torch_outputs, with_batch
from .onnx import ExportResult, check_onnx_file, export_onnx, export_raw

INSTALL_HINT = ("install it with `pip install fxprune[tensorrt]` on a machine with an NVIDIA GPU, "
                "its driver and a CUDA-enabled PyTorch build")


def require_tensorrt() -> Any:
    """The `tensorrt` module, or BackendUnavailable saying exactly what is missing."""
    missing: list[str] = []
    trt = None
    try:
        import tensorrt as trt  # noqa: F811
    except Exception as err:  # noqa: BLE001 - ImportError, or a broken CUDA library load
        missing.append(f"the `tensorrt` Python package (import tensorrt failed: {err})")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        missing.append(f"a CUDA GPU visible to PyTorch (torch.cuda.is_available() is False; "
                       f"torch {torch.__version__} is {build})")
    if missing:
        raise BackendUnavailable("TensorRT backend unavailable: missing " + " and ".join(missing)
                                 + "; " + INSTALL_HINT + ".")
    return trt


_LOGGER: Any = None


def trt_logger(trt: Any) -> Any:
    """One logger per process: TensorRT warns when builders/runtimes get different ones."""
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


def trt_major(trt: Any) -> int:
    return int(str(trt.__version__).split(".")[0])


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
             "int8": torch.int8, "uint8": torch.uint8, "int32": torch.int32,
             "int64": torch.int64, "bool": torch.bool}
    for name, tdtype in table.items():
        if hasattr(trt, name) and dtype == getattr(trt, name):
            return tdtype
    raise ExportError(f"TensorRT tensor dtype {dtype} has no torch equivalent here")


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike,
                 input_shapes: dict[str, Sequence[int]], *, fp16_flag: bool = False,
                 strongly_typed: bool = False, max_batch: int = 64,
                 workspace_bytes: int | None = None) -> Path:
    """Parse the ONNX file, build and serialize an engine to `engine_path`.

    `input_shapes` gives the example shape of every network input; the optimization
    profile spans batch 1 .. max_batch with the example batch as the optimum.
    """
    trt = require_tensorrt()
    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    flag_enum = trt.NetworkDefinitionCreationFlag
    flags = 0
    if trt_major(trt) < 10 and hasattr(flag_enum, "EXPLICIT_BATCH"):
        flags |= 1 << int(flag_enum.EXPLICIT_BATCH)
    if strongly_typed and hasattr(flag_enum, "STRONGLY_TYPED"):
        flags |= 1 << int(flag_enum.STRONGLY_TYPED)  # accepted and ignored on 11.x
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT's ONNX parser rejected {onnx_path}: {errs}")

    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)
    profile, dynamic = builder.create_optimization_profile(), False
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.name not in input_shapes:
            raise ExportError(f"no example shape for TensorRT input {tensor.name!r}")
        example = tuple(int(d) for d in input_shapes[tensor.name])
        if all(d >= 0 for d in tensor.shape):
            continue
        dynamic = True
        lo, hi = list(example), list(example)
        for dim, d in enumerate(tensor.shape):
            if d < 0 and dim == 0:
                lo[0], hi[0] = 1, max(max_batch, example[0])
        profile.set_shape(tensor.name, tuple(lo), example, tuple(hi))
    if dynamic:
        config.add_optimization_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path} "
                          "(see the TensorRT log above for the layer it stopped at)")
    engine_path = Path(engine_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    return engine_path


class TrtRunner:
    """A deserialized engine plus one execution context, fed with torch CUDA tensors."""

    def __init__(self, engine: str | os.PathLike | bytes):
        trt = require_tensorrt()
        self._trt = trt
        data = engine if isinstance(engine, (bytes, bytearray)) else Path(engine).read_bytes()
        self._logger = trt_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            where = "<bytes>" if isinstance(engine, (bytes, bytearray)) else str(engine)
            raise ExportError(f"TensorRT could not deserialize the engine {where} (corrupt file, "
                              "or built by another TensorRT version / GPU); rebuild it")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self.stream = torch.cuda.Stream()
        self._keep: list[torch.Tensor] = []

    def input_dtype(self, name: str) -> torch.dtype:
        return _torch_dtype(self._trt, self.engine.get_tensor_dtype(name))

    def enqueue(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        """Bind inputs/outputs and launch on self.stream; results are ready after a sync."""
        if len(inputs) != len(self.input_names):
            raise ExportError(f"engine takes {len(self.input_names)} inputs, got {len(inputs)}")
        keep = []
        for name, t in zip(self.input_names, inputs):
            t = t.to(device="cuda", dtype=self.input_dtype(name)).contiguous()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outs = []
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = _torch_dtype(self._trt, self.engine.get_tensor_dtype(name))
            out = torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        self._keep = keep + outs  # keep buffers alive until the stream has used them
        self.stream.wait_stream(torch.cuda.current_stream())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise ExportError("TensorRT execute_async_v3 failed")
        return outs

    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        outs = self.enqueue(*inputs)
        self.stream.synchronize()
        return outs


def export_tensorrt(model: nn.Module, path: str | os.PathLike, example_inputs: Any,
                    dynamic_batch: bool = True, fp16: bool = False, max_batch: int = 64,
                    onnx_path: str | os.PathLike | None = None, rtol: float | None = None,
                    atol: float | None = None, workspace_bytes: int | None = None,
                    exporter: str = "auto", opset: int | None = None) -> ExportResult:
    """Export to ONNX, build a TensorRT engine, save it, load it back and compare with PyTorch.

    Tolerances default to 1e-2 (FP32; TensorRT uses TF32 kernels) or 5e-2 (FP16); `atol`
    is scaled by the largest reference magnitude, since logits of random nets can be large.
    """
    trt = require_tensorrt()
    start = time.perf_counter()
    inputs = as_input_tuple(example_inputs)
    path = Path(path)
    onnx_path = Path(onnx_path) if onnx_path else path.with_suffix(".onnx")
    if onnx_path == path:
        raise ExportError(f"the engine path {path} and the ONNX path must differ")
    fp16_onnx = fp16 and not hasattr(trt.BuilderFlag, "FP16")  # 11.x: no weak typing
    work = eval_copy(model)

    if fp16_onnx:
        half = eval_copy(model).cuda().half()
        half_in = tuple(t.cuda().half() if t.is_floating_point() else t.cuda() for t in inputs)
        used, _, _ = export_raw(half, onnx_path, half_in, dynamic_batch=dynamic_batch,
                                opset=opset, exporter=exporter)
        del half
    else:
        used = export_onnx(work, onnx_path, inputs, dynamic_batch=dynamic_batch, opset=opset,
                           exporter=exporter).exporter
    proto = check_onnx_file(onnx_path)
    in_names = [i.name for i in proto.graph.input
                if i.name not in {init.name for init in proto.graph.initializer}]
    rtol = rtol if rtol is not None else (5e-2 if fp16 else 1e-2)
    atol = atol if atol is not None else (5e-2 if fp16 else 1e-2)
    b0 = int(inputs[0].shape[0]) if inputs[0].dim() else 1
    sizes = [b0] + ([3 if b0 == 2 else 2] if dynamic_batch and inputs[0].dim() else [])
    max_abs = max_rel = 0.0
    with atomic_path(path) as tmp:  # the engine appears at `path` only once it passed its check
        build_engine(onnx_path, tmp, {n: tuple(t.shape) for n, t in zip(in_names, inputs)},
                     fp16_flag=fp16 and not fp16_onnx, strongly_typed=fp16_onnx,
                     max_batch=max_batch, workspace_bytes=workspace_bytes)
        runner = TrtRunner(tmp)  # load back what was saved: that is what users will deploy
        for b in sizes:
            x = with_batch(inputs, b) if b != b0 else inputs
            ref = torch_outputs(work, x)
            got = [o.float().cpu().numpy() for o in runner(*x)]
            scale = max([1.0] + [float(np.abs(r).max()) for r in ref if r.size])
            a, r = compare(ref, got, runner.output_names, rtol, atol * scale,
                           f"TensorRT engine {path.name} (batch {b}, {'fp16' if fp16 else 'fp32'})")
            max_abs, max_rel = max(max_abs, a), max(max_rel, r)
    opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return ExportResult(path=str(path), backend="tensorrt", max_abs_diff=max_abs,
                        max_rel_diff=max_rel, opset=opset_used, input_names=runner.input_names,
                        output_names=runner.output_names, seconds=time.perf_counter() - start,
                        exporter=f"{used}+tensorrt-{trt.__version__}", dynamic_batch=dynamic_batch,
                        checked_batch_sizes=sizes, fp16=fp16, onnx_path=str(onnx_path))
