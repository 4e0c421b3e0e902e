"""`fxprune.export`: one entry point that dispatches to the ONNX or TensorRT lowering."""
from __future__ import annotations

import os
from typing import Any

from torch import nn

from fxprune.errors import ConfigError

from .onnx import ExportResult, export_onnx

EXPORT_BACKENDS = ("onnx", "tensorrt")


def export(model: nn.Module, path: str | os.PathLike, backend: str = "onnx",
           example_inputs: Any = None, dynamic_batch: bool = True, fp16: bool = False,
           **kw: Any) -> ExportResult:
    """Write `model` as a validated deployable artifact and say how closely it matches PyTorch.

    backend="onnx": one self-contained .onnx file checked in ONNX Runtime (CPU).
    backend="tensorrt": an engine built from the ONNX file (saved next to it), checked on the GPU.
    Extra keywords go to export_onnx / export_tensorrt (opset, rtol, atol, max_batch, ...).
    """
    if backend not in EXPORT_BACKENDS:
        raise ConfigError(f"unknown export backend {backend!r}; valid: {', '.join(EXPORT_BACKENDS)}")
    if example_inputs is None:
        raise ConfigError("export needs example_inputs, e.g. example_inputs=(torch.randn(1, 3, 224, 224),)")
    if backend == "onnx":
        if fp16:
            raise ConfigError("fp16=True is only supported with backend='tensorrt'; "
                              "the ONNX export is FP32 and validated in ONNX Runtime on CPU")
        return export_onnx(model, path, example_inputs, dynamic_batch=dynamic_batch, **kw)
    from .tensorrt import export_tensorrt  # imports nothing GPU-related until called

    return export_tensorrt(model, path, example_inputs, dynamic_batch=dynamic_batch, fp16=fp16, **kw)
