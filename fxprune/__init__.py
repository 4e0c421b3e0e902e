"""fxprune: a torch.fx graph-transformation compiler for pruning convolutional networks.

trace -> analyze -> method passes (prepare / train / decide) -> finalize -> lower (export).
"""
from fxprune.analysis import analyze
from fxprune.api import CompileReport, CompileResult, Prepared, compile, finalize, prepare
from fxprune.budget import Budget
from fxprune.cost import CostModel, count_macs
from fxprune.errors import (
    AnalysisError, BackendUnavailable, BudgetError, ConfigError, EquivalenceError, ExportError,
    FxpruneError, FxpruneWarning, TraceError,
)
from fxprune.ir import ChannelGraph, ChannelGroup
from fxprune.tracing import trace


def export(model, path, backend: str = "onnx", **kwargs):
    """Export ``model`` to ``path`` (``backend="onnx"`` or ``"tensorrt"``), validated; see fxprune.backends."""
    from fxprune.backends import export as _export

    return _export(model, path, backend=backend, **kwargs)


__all__ = [
    "trace", "analyze", "prepare", "finalize", "compile", "export", "Budget", "CostModel",
    "count_macs", "ChannelGraph", "ChannelGroup", "Prepared", "CompileResult", "CompileReport",
    "FxpruneError", "TraceError", "AnalysisError", "EquivalenceError", "BudgetError",
    "BackendUnavailable", "ExportError", "ConfigError", "FxpruneWarning",
]
__version__ = "0.1.0"
