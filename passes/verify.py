"""Equivalence checking: a finalized module must compute what its gated module computes.

Finalize runs the gated module once and records the outputs plus the few intermediate values it
needs (``record``); the check then runs the finalized module once and compares
(``verify_against``). Both runs go through ``run_graph``, which executes the graph node by node
without writing the module's Python code: generating and compiling that code costs a third of a
forward on mobilenet_v2, and neither run needs it (the finalized module writes its code when the
user first calls it). ``run_graph`` also taps any node's value and names the node that fails.
Only a failure pays for a diagnosis: both modules are re-run keeping every value to name the
first diverging node, and in float64 to tell float32 rounding that the model itself amplifies
from a real finalize bug.

    >>> import torch, torch.fx as fx
    >>> gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
    >>> keep = lambda node, value: value if node.op == "call_module" else None
    >>> out, seen = run_graph(gm, (torch.ones(1, 2),), keep)
    >>> sorted(seen), bool(torch.equal(out, seen["_1"]))
    (['_0', '_1'], True)
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx as fx
from torch.fx.node import map_aggregate, map_arg

from fxprune.errors import EquivalenceError, FxpruneWarning

# A tap records a node's value whole (None), or for ``(dim, positions)`` a summary of those
# positions along ``dim``: row 0 holds each position's first element, row 1 the largest deviation
# from it (finalize only asks whether a removed channel is a constant, and which).
Tap = tuple[int, list[int]] | None


class NodeFailed(Exception):
    """A node of a graph raised while ``run_graph`` ran it (the original error is the cause)."""

    def __init__(self, node: fx.Node, exc: BaseException):
        super().__init__(f"node '{node.name}' ({node.op} {_target_name(node)}): {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}")
        self.node = node.name


def _target_name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


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


def run_graph(gm: fx.GraphModule, inputs: Sequence[Any],
              keep: Callable[[fx.Node, Any], Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """Run ``gm``'s graph on ``inputs`` in eval mode without grad, one node at a time, freeing
    each value after its last use as the generated code would; return the output and, by node
    name, what ``keep(node, value)`` returned for the nodes where that is not None.

    Unlike ``gm(*inputs)`` this never writes the module's code, and unlike ``fx.Interpreter``
    it adds about 2 us per node. Module hooks run (modules are called); the root's own forward
    hooks do not. Raises ``NodeFailed`` naming the node whose op raised."""
    nodes = list(gm.graph.nodes)
    last_use: dict[fx.Node, int] = {}
    for i, n in enumerate(nodes):
        last_use[n] = i  # a value nothing reads is dropped at once
        for a in n.all_input_nodes:
            last_use[a] = i
    free: list[list[fx.Node]] = [[] for _ in nodes]
    for a, i in last_use.items():
        free[i].append(a)
    modules = dict(gm.named_modules(remove_duplicate=False)) if any(n.op == "call_module" for n in nodes) else {}
    env: dict[fx.Node, Any] = {}
    kept: dict[str, Any] = {}
    pending = list(inputs)
    with eval_mode(gm):
        for i, n in enumerate(nodes):
            if n.op == "output":
                return map_arg(n.args[0], env.__getitem__), kept
            try:
                value = pending.pop(0) if n.op == "placeholder" and pending else _execute(gm, modules, env, n)
            except Exception as exc:  # noqa: BLE001 - re-raised with the node named
                raise NodeFailed(n, exc) from exc
            if keep is not None:
                k = keep(n, value)
                if k is not None:
                    kept[n.name] = k
            env[n] = value
            for a in free[i]:
                del env[a]
    return None, kept  # a graph without an output node returns None, as its generated code would


def _execute(gm: fx.GraphModule, modules: dict[str, torch.nn.Module], env: dict[fx.Node, Any], n: fx.Node) -> Any:
    """One node's value. A function of its own, so that the arguments it gathers are released
    when it returns rather than held through the next node's run."""
    if n.op == "placeholder":  # an input not passed: the placeholder's default
        return n.args[0]
    if n.op == "get_attr":
        value: Any = gm
        for atom in n.target.split("."):
            value = getattr(value, atom)
        return value
    args, kwargs = map_arg(n.args, env.__getitem__), map_arg(n.kwargs, env.__getitem__)
    if n.op == "call_module":
        return modules[n.target](*args, **kwargs)
    if n.op == "call_function":
        return n.target(*args, **kwargs)
    return getattr(args[0], n.target)(*args[1:], **kwargs)


def record(gm: fx.GraphModule, inputs: Sequence[Any], taps: dict[str, Tap]) -> tuple[Any, dict[str, torch.Tensor]]:
    """Run ``gm`` once (``run_graph``); return its output and the tapped values (see ``Tap``).
    A failure of ``gm`` itself propagates as the op's own exception."""
    def keep(node: fx.Node, value: Any) -> torch.Tensor | None:
        if node.name not in taps or not isinstance(value, torch.Tensor):
            return None
        return _summary(value, taps[node.name])

    try:
        return run_graph(gm, inputs, keep if taps else None)
    except NodeFailed as failed:
        raise failed.__cause__ from None  # type: ignore[misc]


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


def _failure(failed: NodeFailed) -> EquivalenceError:
    return EquivalenceError(
        f"the finalized module fails at {failed}. This is a bug in fxprune's finalize for this graph; please "
        "report it with the model.", node=failed.node)


def _node_values(gm: fx.GraphModule, inputs: Sequence[Any]) -> dict[str, torch.Tensor]:
    """Every tensor value of one run, by node name (values an in-place op later changes are
    seen changed: this only locates a divergence)."""
    return run_graph(gm, inputs, lambda _n, v: v if isinstance(v, torch.Tensor) else None)[1]


def _run(candidate: fx.GraphModule, inputs: Sequence[Any]) -> Any:
    """The candidate's output; a failure names the node."""
    try:
        return run_graph(candidate, inputs)[0]
    except NodeFailed as failed:
        raise _failure(failed) from failed.__cause__


def _float64_rel_diff(reference: fx.GraphModule, candidate: fx.GraphModule, inputs: Sequence[Any]) -> float | None:
    """The comparison redone in float64, or None when the inputs are not float32."""
    if not any(isinstance(x, torch.Tensor) and x.dtype == torch.float32 for x in leaves(list(inputs))):
        return None
    to64 = lambda v: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v  # noqa: E731
    inputs64 = map_aggregate(tuple(inputs), to64)
    ref, cand = copy.deepcopy(reference).double(), copy.deepcopy(candidate).double()
    return compare_outputs(_run(cand, inputs64), record(ref, inputs64, {})[0])[1]


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
    new_vals, ref_vals = _node_values(candidate, inputs), _node_values(reference, inputs)
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
    return verify_against(reference, record(reference, inputs, {})[0], candidate, inputs, rtol)
