"""fxprune's exceptions: each says what failed, where in the graph, and what to do."""
from __future__ import annotations


class FxpruneError(Exception):
    """Base class of every error fxprune raises on purpose."""


class TraceError(FxpruneError):
    """The model (or its root forward) cannot be symbolically traced by torch.fx."""


class AnalysisError(FxpruneError):
    """The channel analysis met a graph it cannot describe."""


class EquivalenceError(FxpruneError):
    """A finalized module does not compute what the gated module computes."""

    def __init__(self, message: str, max_abs_diff: float = float("nan"), node: str | None = None):
        super().__init__(message)
        self.max_abs_diff = max_abs_diff
        self.node = node


class BudgetError(FxpruneError):
    """A budget cannot be met (for example it is below what unprunable layers already cost)."""


class BackendUnavailable(FxpruneError):
    """A backend's runtime (TensorRT, CUDA, ...) is missing on this machine."""


class ExportError(FxpruneError):
    """An exported artifact failed its check or does not match the PyTorch model."""


class ConfigError(FxpruneError):
    """An argument (method name, budget, option) is not valid."""


class FxpruneWarning(UserWarning):
    """Something the user should know that does not make the result wrong."""
