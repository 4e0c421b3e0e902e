"""fxprune: a torch.fx graph-transformation compiler for pruning convolutional networks.

trace -> analyze -> method passes (prepare / train / decide) -> finalize -> lower (export).

The core (tracing, the channel IR and its op rules, cost, budgets, methods' interface, scores)
is imported here; the user-facing flow (``compile``, ``prepare``, ``finalize``, ``export``,
``build_latency_model``),
which sits above the passes and backends, is loaded on first use, so that any module of the
package can be imported first without an import cycle.
"""
from fxprune import rules, scores
from fxprune.analysis import analyze
from fxprune.budget import Budget
from fxprune.cost import CostModel, count_macs
from fxprune.decision import Decision
from fxprune.errors import (
    AnalysisError, BackendUnavailable, BudgetError, ConfigError, EquivalenceError, ExportError,
    FxpruneError, FxpruneWarning, TraceError,
)
from fxprune.ir import ChannelGraph, ChannelGroup
from fxprune.method import Context, Method, register_method
from fxprune.rules import OpRule, register_op
from fxprune.tracing import trace

_FLOW = {"compile", "prepare", "finalize", "Prepared", "CompileResult", "CompileReport", "get_method"}


def __getattr__(name: str):
    if name in _FLOW:
        from fxprune.flow import api

        return getattr(api, name)
    if name in ("save", "load"):
        from fxprune.flow import saving

        return getattr(saving, name)
    if name == "build_latency_model":
        from fxprune.flow import latency_model

        return latency_model.build_latency_model
    raise AttributeError(f"module 'fxprune' has no attribute {name!r}")


def export(model, path, backend: str = "onnx", **kwargs):
    """Export ``model`` to ``path`` (``backend="onnx"`` or ``"tensorrt"``), validated; see
    ``fxprune.backends.export``. Raises ``ConfigError`` and ``BackendUnavailable`` before anything
    is written, ``ExportError`` when the artifact fails its check."""
    from fxprune.backends import export as _export

    return _export(model, path, backend=backend, **kwargs)


__all__ = [
    "trace", "analyze", "prepare", "finalize", "compile", "export", "save", "load", "Budget", "CostModel",
    "count_macs", "ChannelGraph", "ChannelGroup", "Prepared", "CompileResult", "CompileReport",
    "Decision", "Method", "Context", "register_method", "get_method", "build_latency_model", "rules", "scores",
    "register_op", "OpRule", "FxpruneError", "TraceError", "AnalysisError", "EquivalenceError",
    "BudgetError", "BackendUnavailable", "ExportError", "ConfigError", "FxpruneWarning",
]
__version__ = "0.1.0"
