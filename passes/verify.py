"""Equivalence checking: a finalized module must compute what its gated module computes.

Finalize runs the gated module once and records the outputs plus the few intermediate values it
needs (``record``: the module's compiled code with pre-hooks when every value is a module's
input, else an interpreter); the check then runs the finalized
module once and compares (``verify_against``). Only a failure pays for a diagnosis: both modules
are re-run node by node to name the first diverging node, and in float64 to tell float32
rounding that the model itself amplifies from a real finalize bug.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any, Iterator, Sequence

import torch
import torch.fx as fx
from torch.fx.node import map_aggregate

from fxprune.errors import EquivalenceError, FxpruneWarning

# A tap records a node's value whole (None), or for ``(dim, positions)`` a summary of those
# positions along ``dim``: row 0 holds each position's first element, row 1 the largest deviation
# from it (finalize only asks whether a removed channel is a constant, and which).
Tap = tuple[int, list[int]] | None


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no grad for the duration; every submodule's own mode is restored."""
    # The flag itself, through the instance dict: Module.train() recurses (O(modules x depth))
    # and Module.__setattr__ checks three tables per write; a module already in eval mode is
    # left alone.
    training = [m for m in module.modules() if m.training]
    for m in training:
        m.__dict__["training"] = False
    try:
        with torch.no_grad():
            yield
    finally:
        for m in training:
            m.__dict__["training"] = True


def _summary(value: torch.Tensor, tap: Tap) -> torch.Tensor:
    if tap is None:
        return value
    dim, positions = tap
    cols = value.index_select(dim, torch.tensor(positions)).movedim(dim, 0).reshape(len(positions), -1)
    return torch.stack([cols[:, 0], (cols - cols[:, :1]).abs().amax(1)])


class _Tapper(fx.Interpreter):
    """Runs a graph node by node and keeps the tapped values; values are freed after their last
    use as usual."""

    def __init__(self, gm: fx.GraphModule, taps: dict[str, Tap]):
        super().__init__(gm)
        self.taps = taps
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if n.name in self.taps and isinstance(result, torch.Tensor):
            self.values[n.name] = _summary(result, self.taps[n.name])
        return result


def _hooked_run(gm: fx.GraphModule, inputs: Sequence[Any], taps: dict[str, Tap]) -> tuple[Any, dict[str, torch.Tensor]] | None:
    """The same recording through the module's own compiled forward, when every tap is the
    input of a module called once (a consumer conv/linear): pre-hooks see those inputs. None
    when some tap is not of that kind."""
    calls: dict[str, int] = {}
    tapped_by: dict[str, list[str]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
            if n.args and isinstance(n.args[0], fx.Node) and n.args[0].name in taps:
                tapped_by.setdefault(n.args[0].name, []).append(n.target)
    if set(tapped_by) != set(taps) or any(calls[t] > 1 for ts in tapped_by.values() for t in ts):
        return None
    values: dict[str, torch.Tensor] = {}
    handles = []
    for name, targets in tapped_by.items():
        def hook(_mod, args, name=name):
            if name not in values and args and isinstance(args[0], torch.Tensor):
                values[name] = _summary(args[0], taps[name])
        handles.append(gm.get_submodule(targets[0]).register_forward_pre_hook(hook))
    try:
        out = gm(*inputs)
    finally:
        for h in handles:
            h.remove()
    return (out, values) if set(values) == set(taps) else None


def record(gm: fx.GraphModule, inputs: Sequence[Any], taps: dict[str, Tap]) -> tuple[Any, dict[str, torch.Tensor]]:
    """Run ``gm`` once in eval mode; return its output and the tapped values (see ``Tap``).

    Uses the module's own compiled forward with pre-hooks when the taps allow it (inputs of
    consumer modules, the usual case), else an interpreter; either way one run.
    """
    with eval_mode(gm):
        hooked = _hooked_run(gm, inputs, taps)
        if hooked is not None:
            return hooked
        tapper = _Tapper(gm, taps)
        return tapper.run(*inputs), tapper.values


def leaves(value: Any) -> list[torch.Tensor]:
    """The tensors of a (nested) output, in order. Raises nothing."""
    out: list[torch.Tensor] = []
    if isinstance(value, dict):
        value = list(value.values())
    map_aggregate(value, lambda v: out.append(v) if isinstance(v, torch.Tensor) else None)
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max abs diff, diff relative to max |b|); any NaN/Inf in either is an infinite difference."""
    if not a.numel():
        return 0.0, 0.0
    a64, b64 = a.double(), b.double()
    if not (bool(torch.isfinite(a64).all()) and bool(torch.isfinite(b64).all())):
        return float("inf"), float("inf")
    diff = (a64 - b64).abs().max().item()
    return diff, diff / max(b64.abs().max().item(), 1e-12)


def compare_outputs(new_out: Any, ref_out: Any) -> tuple[float, float]:
    """(max abs, max relative) difference over matching output tensors; NaN/Inf is infinite.
    Raises ``EquivalenceError`` when the outputs differ in number or shape."""
    ref_leaves, new_leaves = leaves(ref_out), leaves(new_out)
    if len(ref_leaves) != len(new_leaves):
        raise EquivalenceError(f"finalized module returns {len(new_leaves)} tensors, the gated module {len(ref_leaves)}")
    worst_abs, worst_rel = 0.0, 0.0
    for i, (a, b) in enumerate(zip(new_leaves, ref_leaves)):
        if a.shape != b.shape:
            raise EquivalenceError(f"output {i} has shape {tuple(a.shape)} after finalize, {tuple(b.shape)} before")
        d, r = _rel(a, b)
        worst_abs, worst_rel = max(worst_abs, d), max(worst_rel, r)
    return worst_abs, worst_rel


class _NodeRecorder(fx.Interpreter):
    """Runs a graph node by node, keeping every tensor value, and names the node that fails."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as exc:  # noqa: BLE001 - re-raised with the node named
            raise EquivalenceError(
                f"the finalized module fails at node '{n.name}' ({n.op} {n.target}): {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}. This is a bug in fxprune's finalize for "
                "this graph; please report it with the model.", node=n.name) from exc
        if isinstance(result, torch.Tensor):
            self.values[n.name] = result
        return result


def _node_values(gm: fx.GraphModule, inputs: Sequence[Any]) -> tuple[Any, dict[str, torch.Tensor]]:
    with eval_mode(gm):
        rec = _NodeRecorder(gm)
        return rec.run(*inputs), rec.values


def _run(candidate: fx.GraphModule, inputs: Sequence[Any]) -> Any:
    """The candidate's compiled forward; if it raises, re-run node by node to name the node."""
    try:
        with eval_mode(candidate):
            return candidate(*inputs)
    except Exception:  # noqa: BLE001 - diagnosed below
        _node_values(candidate, inputs)
        raise


def _float64_rel_diff(reference: fx.GraphModule, candidate: fx.GraphModule, inputs: Sequence[Any]) -> float | None:
    """The comparison redone in float64, or None when the inputs are not float32."""
    if not any(isinstance(x, torch.Tensor) and x.dtype == torch.float32 for x in leaves(list(inputs))):
        return None
    to64 = lambda v: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v  # noqa: E731
    inputs64 = map_aggregate(tuple(inputs), to64)
    ref, cand = copy.deepcopy(reference).double(), copy.deepcopy(candidate).double()
    with eval_mode(ref), eval_mode(cand):
        return compare_outputs(cand(*inputs64), ref(*inputs64))[1]


def verify_against(reference: fx.GraphModule, ref_out: Any, candidate: fx.GraphModule,
                   inputs: Sequence[Any], rtol: float = 1e-4) -> tuple[float, float]:
    """Compare ``candidate`` on ``inputs`` with ``ref_out`` (``reference``'s recorded output).

    Returns (max abs diff, max relative diff) or raises ``EquivalenceError``. The relative
    difference is taken against the largest magnitude of each reference output; NaN or Inf in
    either output is a mismatch. A float32 failure is re-run in float64: some models (untrained
    EfficientNet-B2..B6 among torchvision's) amplify float32 rounding in the gated model itself by
    more than ``rtol``, so a float32 difference alone does not prove finalize wrong. If float64
    agrees to ``rtol / 1000`` the check passes with a warning; otherwise the error names the first
    diverging node.
    """
    worst_abs, worst_rel = compare_outputs(_run(candidate, inputs), ref_out)
    if worst_rel <= rtol:
        return worst_abs, worst_rel
    if not all(bool(torch.isfinite(t).all()) for t in leaves(ref_out)):
        raise EquivalenceError("the gated module itself outputs NaN or Inf on the example inputs, so no pruned "
                               "module can be checked against it: check the model's weights and inputs",
                               max_abs_diff=worst_abs)
    rel64 = _float64_rel_diff(reference, candidate, inputs)
    if rel64 is not None and rel64 <= rtol * 1e-3:
        warnings.warn(f"fxprune: finalized and gated modules differ by {worst_rel:.3g} (relative) in float32 but "
                      f"only {rel64:.3g} in float64: this model amplifies float32 rounding; the finalize is exact.",
                      FxpruneWarning, stacklevel=3)
        return worst_abs, worst_rel
    _, new_vals = _node_values(candidate, inputs)
    _, ref_vals = _node_values(reference, inputs)
    first = next((n.name for n in candidate.graph.nodes
                  if n.name in new_vals and n.name in ref_vals and new_vals[n.name].shape == ref_vals[n.name].shape
                  and _rel(new_vals[n.name], ref_vals[n.name])[1] > rtol), None)
    in64 = "" if rel64 is None else f" (float64: {rel64:.3g})"
    raise EquivalenceError(
        f"finalized module differs from the gated module: max abs diff {worst_abs:.3g}, relative "
        f"{worst_rel:.3g}{in64} > {rtol:g}; first diverging node: {first}. This is a bug in fxprune's "
        "finalize for this graph; please report it with the model.",
        max_abs_diff=worst_abs, node=first,
    )


def check_equivalence(reference: fx.GraphModule, candidate: fx.GraphModule, inputs: Sequence[Any],
                      rtol: float = 1e-4) -> tuple[float, float]:
    """Run ``reference`` and ``candidate`` on ``inputs`` and compare them (see ``verify_against``).

    Raises ``EquivalenceError`` on a mismatch, NaN/Inf, or a failure to run the candidate.
    """
    with eval_mode(reference):
        ref_out = reference(*inputs)
    return verify_against(reference, ref_out, candidate, inputs, rtol)
