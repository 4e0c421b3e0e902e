"""fxprune: a torch.fx graph-transformation compiler for pruning convolutional networks."""
from fxprune.analysis import analyze
from fxprune.errors import (
    AnalysisError, BackendUnavailable, BudgetError, ConfigError, EquivalenceError, ExportError,
    FxpruneError, TraceError,
)
from fxprune.ir import ChannelGraph, ChannelGroup
from fxprune.tracing import trace

__all__ = [
    "trace", "analyze", "ChannelGraph", "ChannelGroup", "FxpruneError", "TraceError",
    "AnalysisError", "EquivalenceError", "BudgetError", "BackendUnavailable", "ExportError",
    "ConfigError",
]
__version__ = "0.1.0"
