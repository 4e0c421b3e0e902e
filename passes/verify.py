"""Equivalence checking: a finalized module must compute what its gated module computes."""
from __future__ import annotations

import copy
import warnings
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch.fx.node import map_aggregate

from fxprune.errors import EquivalenceError, FxpruneWarning


class _Recorder(fx.Interpreter):
    """Runs a graph and keeps the values of chosen nodes (their output, or their first input)."""

    def __init__(self, gm: fx.GraphModule, names: set[str] | None, arg: bool):
        super().__init__(gm)
        self.names, self.arg, self.values = names, arg, {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if self.names is None or n.name in self.names:
            value = self.env[n.args[0]] if self.arg else result
            if isinstance(value, torch.Tensor):
                self.values[n.name] = value
        return result


def _eval_run(gm: fx.GraphModule, inputs: Sequence[Any], names: set[str] | None, arg: bool) -> tuple[Any, dict[str, torch.Tensor]]:
    modes = {m: m.training for m in gm.modules()}
    gm.eval()
    try:
        with torch.no_grad():
            rec = _Recorder(gm, names, arg)
            out = rec.run(*inputs)
    finally:
        for m, mode in modes.items():
            m.train(mode)
    return out, rec.values


def record_values(gm: fx.GraphModule, names: set[str], arg: bool = False) -> dict[str, torch.Tensor]:
    """Eval-mode values of ``names`` (or of their first argument) on the traced example inputs."""
    return _eval_run(gm, gm.meta["fxprune_example_inputs"], names, arg)[1]


def _leaves(value: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    map_aggregate(value, lambda v: out.append(v) if isinstance(v, torch.Tensor) else None)
    if isinstance(value, dict):
        out = [v for v in value.values() if isinstance(v, torch.Tensor)]
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    diff = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    scale = b.double().abs().max().item() if b.numel() else 0.0
    return diff, diff / max(scale, 1e-12)


def _compare(reference: fx.GraphModule, candidate: fx.GraphModule, inputs: Sequence[Any]):
    """(max abs diff, max relative diff, candidate node values, reference node values)."""
    ref_out, ref_vals = _eval_run(reference, inputs, None, False)
    new_out, new_vals = _eval_run(candidate, inputs, None, False)
    ref_leaves, new_leaves = _leaves(ref_out), _leaves(new_out)
    if len(ref_leaves) != len(new_leaves):
        raise EquivalenceError(f"finalized module returns {len(new_leaves)} tensors, the gated module {len(ref_leaves)}")
    worst_abs, worst_rel = 0.0, 0.0
    for i, (a, b) in enumerate(zip(new_leaves, ref_leaves)):
        if a.shape != b.shape:
            raise EquivalenceError(f"output {i} has shape {tuple(a.shape)} after finalize, {tuple(b.shape)} before")
        d, r = _rel(a, b)
        worst_abs, worst_rel = max(worst_abs, d), max(worst_rel, r)
    return worst_abs, worst_rel, new_vals, ref_vals


def _float64_rel_diff(reference: fx.GraphModule, candidate: fx.GraphModule, inputs: Sequence[Any]) -> float | None:
    """The same comparison in float64, or None when the inputs are not float32."""
    if not any(isinstance(x, torch.Tensor) and x.dtype == torch.float32 for x in _leaves(list(inputs))):
        return None
    to64 = lambda v: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v  # noqa: E731
    inputs64 = map_aggregate(tuple(inputs), to64)
    return _compare(copy.deepcopy(reference).double(), copy.deepcopy(candidate).double(), inputs64)[1]


def check_equivalence(reference: fx.GraphModule, candidate: fx.GraphModule, inputs: Sequence[Any],
                      rtol: float = 1e-4) -> tuple[float, float]:
    """Compare outputs in eval mode; return (max abs diff, max relative diff) or raise.

    The relative difference is taken against the largest magnitude of each reference output.
    A float32 failure is re-run in float64: some models (untrained EfficientNet-B2..B6 among
    torchvision's) amplify float32 rounding in the gated model itself by more than ``rtol``, so
    a float32 difference alone does not prove finalize wrong. If float64 agrees to ``rtol / 1000``
    the check passes with a warning; otherwise the error names the first diverging node.
    """
    worst_abs, worst_rel, new_vals, ref_vals = _compare(reference, candidate, inputs)
    if worst_rel <= rtol:
        return worst_abs, worst_rel
    rel64 = _float64_rel_diff(reference, candidate, inputs)
    if rel64 is not None and rel64 <= rtol * 1e-3:
        warnings.warn(f"fxprune: finalized and gated modules differ by {worst_rel:.3g} (relative) in float32 but "
                      f"only {rel64:.3g} in float64: this model amplifies float32 rounding; the finalize is exact.",
                      FxpruneWarning, stacklevel=3)
        return worst_abs, worst_rel
    first = None
    for n in candidate.graph.nodes:
        a, b = new_vals.get(n.name), ref_vals.get(n.name)
        if a is not None and b is not None and a.shape == b.shape and _rel(a, b)[1] > rtol:
            first = n.name
            break
    in64 = "" if rel64 is None else f" (float64: {rel64:.3g})"
    raise EquivalenceError(
        f"finalized module differs from the gated module: max abs diff {worst_abs:.3g}, relative "
        f"{worst_rel:.3g}{in64} > {rtol:g}; first diverging node: {first}. This is a bug in fxprune's "
        "finalize for this graph; please report it with the model.",
        max_abs_diff=worst_abs, node=first,
    )
