"""The backends fxprune measures and deploys on, one record each; the only list of their names.

A record says how to export for the backend (``export``: the artifact writer, or None when it
runs the PyTorch module itself), how to run and time a model on it (``runner``), why it cannot
run here (``unavailable``) and its channel multiple (``multiple``, detected on this machine).
``fxprune.export``, ``measure_latency`` / ``compare_latency``, ``compile(validate=...)``, latency
budgets and the CLI all read this table: a new backend is one more record.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from fxprune.errors import BackendUnavailable, ConfigError

from . import runners
from .hardware import ChannelMultiple, detect_multiple


def _ort_missing(name: str) -> str | None:
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None:
        return f"backend {name!r} needs onnxruntime, which is not installed; pip install onnxruntime"
    return None


def _tensorrt_missing(name: str) -> str | None:
    from .tensorrt import require_tensorrt

    try:
        require_tensorrt()
    except BackendUnavailable as err:
        return str(err)
    return None


def _export_onnx(*args, **kw):
    from .onnx import export_onnx

    return export_onnx(*args, **kw)


def _export_tensorrt(*args, **kw):
    from .tensorrt import export_tensorrt

    return export_tensorrt(*args, **kw)


@dataclass(frozen=True)
class Backend:
    """One runtime: where it runs, what it deploys, how it is timed, whether it runs here."""

    name: str
    device: str  # "cpu" or "cuda"
    artifact: str | None  # the export backend name that deploys to it ("onnx", "tensorrt"), or None
    runner: runners.Runner
    missing: Callable[[str], str | None]
    export: Callable[..., object] | None = None
    takes_files: bool = False  # measure_latency accepts an exported file for it

    def unavailable(self) -> str | None:
        """Why this backend cannot run on this machine, or None when it can."""
        return self.missing(self.name)

    def require(self) -> "Backend":
        why = self.unavailable()
        if why:
            raise BackendUnavailable(why)
        return self

    def multiple(self, measure: bool = True) -> ChannelMultiple:
        """The channel multiple on this machine (measured once per process)."""
        self.require()
        return detect_multiple(self.name, measure)


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("onnxruntime", "cpu", "onnx", runners.run_onnxruntime, _ort_missing, _export_onnx, takes_files=True),
    Backend("torch", "cpu", None, runners.run_torch, lambda name: None),
    Backend("torch-cuda", "cuda", None, runners.run_torch, runners.cuda_missing),
    Backend("tensorrt", "cuda", "tensorrt", runners.run_tensorrt, _tensorrt_missing, _export_tensorrt,
            takes_files=True),
)}



def latency_backends() -> tuple[str, ...]:
    """The names ``measure_latency``, ``compile(validate=)`` and latency budgets accept.
    Raises nothing."""
    return tuple(BACKENDS)


def export_backends() -> tuple[str, ...]:
    """The names ``fxprune.export`` accepts: the artifacts of the backends that deploy files.
    Raises nothing."""
    return tuple(b.artifact for b in BACKENDS.values() if b.artifact)


def get(name: str) -> Backend:
    """The record of a latency backend; ``ConfigError`` naming the valid ones otherwise."""
    if not isinstance(name, str) or name not in BACKENDS:
        raise ConfigError(f"unknown latency backend {name!r}; valid: {', '.join(latency_backends())}")
    return BACKENDS[name]


def exporter(artifact: str) -> Backend:
    """The record that deploys export artifact ``artifact`` ("onnx", "tensorrt")."""
    for b in BACKENDS.values():
        if b.artifact == artifact:
            return b
    raise ConfigError(f"unknown export backend {artifact!r}; valid: {', '.join(export_backends())}")


def require_backend(name: str) -> Backend:
    """Check before any work that backend ``name`` exists and runs here; return its record.

    Raises ``ConfigError`` for an unknown name, ``BackendUnavailable`` saying what is missing."""
    return get(name).require()
