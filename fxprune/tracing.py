"""trace: nn.Module -> fx.GraphModule whose every node carries its concrete value's metadata.

Tracing never touches the user's model: it works on a deep copy. A submodule whose forward
cannot be symbolically traced becomes a leaf (an opaque ``call_module`` node) instead of
failing the whole model; the analysis then treats its boundary channels conservatively.
"""
from __future__ import annotations

import copy
import traceback
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch.fx.node import map_aggregate

from fxprune.errors import TraceError

# Modules that stay leaves so that their train/eval behaviour survives tracing.
_KEEP_AS_LEAF: tuple[type, ...] = ()
try:  # torchvision's StochasticDepth branches on self.training in Python.
    from torchvision.ops import StochasticDepth

    _KEEP_AS_LEAF = (StochasticDepth,)
except ImportError:  # pragma: no cover - torchvision is a dependency
    pass


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of a tensor value seen during shape propagation."""

    shape: tuple[int, ...]
    dtype: torch.dtype


class _FallbackTracer(fx.Tracer):
    """A tracer that turns submodules failing to trace into leaves and remembers why."""

    def __init__(self, leaves: dict[str, str] | None = None, discover: bool = False):
        super().__init__()
        self.leaves: dict[str, str] = dict(leaves or {})
        self.discover = discover

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        if qualname in self.leaves or isinstance(m, _KEEP_AS_LEAF):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        if not self.discover:
            return super().call_module(m, forward, args, kwargs)
        path = self.path_of_module(m)
        depth = len(self.module_stack)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:  # noqa: BLE001 - any failure inside a submodule makes it a leaf
            while len(self.module_stack) > depth:
                self.module_stack.popitem(last=True)
            self.leaves[path] = _describe(exc)
            return self.create_proxy("call_module", path, args, kwargs)


def _describe(exc: BaseException) -> str:
    """One line naming the exception and the user-code line that raised it."""
    where = ""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if "/torch/" not in frame.filename:
            where = f" at {frame.filename}:{frame.lineno} `{(frame.line or '').strip()}`"
            break
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}{where}"


def _symbolic_trace(model: torch.nn.Module, tracer: _FallbackTracer) -> fx.GraphModule:
    graph = tracer.trace(model)
    name = model.__class__.__name__
    return fx.GraphModule(tracer.root, graph, name)


def _trace_graph(model: torch.nn.Module) -> tuple[fx.GraphModule, dict[str, str]]:
    try:
        return _symbolic_trace(model, _FallbackTracer()), {}
    except Exception:  # noqa: BLE001 - retried with leaf discovery below
        pass
    finder = _FallbackTracer(discover=True)
    try:
        finder.trace(model)
    except Exception as exc:  # the root forward itself cannot be traced
        raise TraceError(
            f"torch.fx cannot trace the forward of {type(model).__name__} (the root module): "
            f"{_describe(exc)}. Make that forward free of data-dependent Python control flow, "
            "or wrap the offending code in a submodule (it then becomes an opaque leaf)."
        ) from exc
    tracer = _FallbackTracer(leaves=finder.leaves)
    try:
        return _symbolic_trace(model, tracer), dict(finder.leaves)
    except Exception as exc:
        raise TraceError(
            f"torch.fx cannot trace {type(model).__name__} even with untraceable submodules "
            f"{sorted(finder.leaves)} as leaves: {_describe(exc)}"
        ) from exc


class _ValueRecorder(fx.Interpreter):
    """Runs the graph once and stores each node's value metadata (the ShapeProp of fxprune).

    Tensors get a TensorMeta; non-tensor values (sizes, ints, slices) are stored as they are,
    because the analysis needs the concrete arguments of shape ops.
    """

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        n.meta["fxprune_value"] = map_aggregate(result, _meta_of)
        return result


def _meta_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return TensorMeta(tuple(value.shape), value.dtype)
    return value


def propagate_values(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Record value metadata on every node by running ``gm`` on ``example_inputs`` in eval mode."""
    modes = {m: m.training for m in gm.modules()}
    gm.eval()
    try:
        with torch.no_grad():
            _ValueRecorder(gm).run(*example_inputs)
    finally:
        for m, mode in modes.items():
            m.train(mode)


def trace(model: torch.nn.Module, example_inputs: Sequence[Any]) -> fx.GraphModule:
    """Symbolically trace a deep copy of ``model`` and propagate ``example_inputs`` through it.

    Returns a GraphModule whose nodes carry ``meta["fxprune_value"]``; ``gm.meta`` holds the
    example inputs (for the equivalence check) and ``leaf_modules`` (submodules that could not be
    traced, with the reason).
    """
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"fxprune.trace expects an nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    gm, leaves = _trace_graph(copy.deepcopy(model))
    try:
        propagate_values(gm, example_inputs)
    except Exception as exc:
        raise TraceError(
            f"the traced {type(model).__name__} failed to run on the example inputs "
            f"({[tuple(x.shape) for x in example_inputs if isinstance(x, torch.Tensor)]}): "
            f"{_describe(exc)}. Check the example inputs' shapes."
        ) from exc
    gm.meta["fxprune_example_inputs"] = tuple(
        x.detach().clone() if isinstance(x, torch.Tensor) else x for x in example_inputs
    )
    gm.meta["fxprune_leaf_modules"] = leaves
    return gm
