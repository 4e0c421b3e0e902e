"""`fxprune.export`: one entry point that dispatches to the ONNX or TensorRT lowering."""
from __future__ import annotations

import os
from typing import Any

from torch import nn

from fxprune import checks
from fxprune.errors import ConfigError

from ._common import as_input_tuple
from .onnx import ExportResult
from .registry import exporter


def export(model: nn.Module, path: str | os.PathLike, backend: str = "onnx",
           example_inputs: Any = None, dynamic_batch: bool = True, fp16: bool = False,
           **kw: Any) -> ExportResult:
    """Write `model` as a validated deployable artifact and say how closely it matches PyTorch.

    backend="onnx": one self-contained .onnx file checked in ONNX Runtime (CPU).
    backend="tensorrt": an engine built from the ONNX file (saved next to it), checked on the GPU.
    Extra keywords go to export_onnx / export_tensorrt (opset, rtol, atol, max_batch, ...).
    The file appears at `path` only once it passed its check (an older file there stays until then).

    Checked before anything is written. Raises ``ConfigError`` (unknown backend, not a module —
    e.g. a CompileResult instead of ``result.model`` —, missing or bad example inputs, inputs
    the model fails on, a path that cannot be written), ``BackendUnavailable`` (TensorRT or
    CUDA missing); then ``ExportError`` when the artifact fails its check.
    """
    record = exporter(backend)
    model = checks.model(model, "fxprune.export")
    as_input_tuple(example_inputs)
    checks.writable_file(path, "fxprune.export")
    if fp16 and record.device != "cuda":
        raise ConfigError(f"fp16=True is only supported with backend='tensorrt'; the {backend} export is FP32 and "
                          f"validated in {record.name} on the CPU")
    if fp16:
        kw["fp16"] = True
    return record.export(model, path, example_inputs, dynamic_batch=dynamic_batch, **kw)
