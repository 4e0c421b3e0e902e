"""Lowering and measurement: ONNX / TensorRT export with validation, latency on real backends.

``registry.BACKENDS`` holds one record per backend; everything here reads it."""
from __future__ import annotations

from .export import export
from .hardware import ChannelMultiple, detect_multiple
from .latency import LatencyComparison, LatencyResult, compare_latency, measure_latency
from .onnx import ExportResult, export_onnx, validate_onnx
from .registry import BACKENDS, Backend, export_backends, latency_backends, require_backend

__all__ = [
    "BACKENDS", "Backend", "ChannelMultiple", "ExportResult", "LatencyComparison", "LatencyResult",
    "compare_latency", "detect_multiple", "export", "export_backends", "export_onnx", "latency_backends",
    "measure_latency", "require_backend", "validate_onnx",
]
