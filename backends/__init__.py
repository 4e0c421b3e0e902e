"""Lowering and measurement: ONNX / TensorRT export with validation, latency on real backends."""
from __future__ import annotations

from .export import EXPORT_BACKENDS, export
from .latency import BACKENDS as LATENCY_BACKENDS
from .latency import LatencyComparison, LatencyResult, compare_latency, measure_latency, require_backend
from .onnx import ExportResult, export_onnx, validate_onnx

__all__ = [
    "EXPORT_BACKENDS", "LATENCY_BACKENDS", "ExportResult", "LatencyComparison", "LatencyResult",
    "compare_latency", "export", "export_onnx", "measure_latency", "require_backend", "validate_onnx",
]
