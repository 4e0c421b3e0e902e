"""finalize: gated GraphModule -> plain, physically smaller GraphModule computing the same thing.

Steps, each a small function below, all driven by the op rules (``fxprune.rules``):
1. read the decision from the gates (exact zeros are removed units);
2. run the gated module once, recording its outputs and the few values later steps need (the
   constants removed channels carry into consumers are mostly read off the graph instead,
   ``passes.constants``);
3. copy the gated module without its gates, each gate value folded into the parameters of the
   node it gates (``rule.gate_params``);
4. replace fully removed residual/SE branches by their constant; keep one zero channel where a
   live conv would be left with none;
5. absorb the constant a removed channel still feeds a consumer into that consumer's bias
   (where exact; else the channel stays);
6. slice every parameter and buffer a group lists; resize module attributes (``rule.resize``);
7. specialise integers read from channel sizes (``x.shape[1]``) to literals, then rewrite the
   literals that spell out channel counts (``rule.rewrite``: split sizes, view shapes, slices);
8. run the finalized module once and compare with the recorded outputs.

Nothing is written in place: tensors that change are replaced by new ones, the rest are shared
with the gated module while finalizing and cloned at the end, so the result is independent.

    >>> import torch, torch.nn as nn, fxprune
    >>> from fxprune.passes import insert_gates, finalize
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    >>> gm = fxprune.trace(net, (torch.randn(1, 3, 8, 8),))
    >>> cg = fxprune.analyze(gm)
    >>> gated, gates = insert_gates(gm, cg)
    >>> with torch.no_grad(): gates[0].weight[:5] = 0.0
    >>> finalize(gated, cg).get_submodule("3").in_channels
    3
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.node import map_arg

from fxprune.errors import ConfigError
from fxprune.gcpause import gc_paused
from fxprune.ir import ChannelGraph, Layer, ParamSlice, SizeOf
from fxprune.rules import Rewrite, rule_for
from fxprune.rules.base import REGISTRY
from fxprune.passes.branches import dead_branch_plans, eliminate_dead_code, remove_dead_branches
from fxprune.passes.constants import channel_constants
from fxprune.decision import Decision, merge_consumers
from fxprune.passes.gates import apply_decision, gate_free_copy, gate_sites, read_gates
from fxprune.passes.sharing import get_tensor, materialize, replace_tensor, set_tensor, unshare
from fxprune.passes.verify import Tap, record, verify_against

Alive = Callable[[np.ndarray], np.ndarray]  # channel ids -> which survive (ChannelGraph.survivors)


@dataclass
class FinalizeReport:
    """What finalize did, for the compile report."""

    kept: dict[int, int] = field(default_factory=dict)  # group id -> kept units
    sizes: dict[int, int] = field(default_factory=dict)
    retained: dict[int, str] = field(default_factory=dict)  # group -> why units were kept anyway
    removed_branches: list[str] = field(default_factory=list)
    keep: dict[int, np.ndarray] = field(default_factory=dict)  # the final masks (retained units included)
    max_abs_diff: float = 0.0
    max_rel_diff: float = 0.0


def _folded_copy(gated: fx.GraphModule, values: dict[int, torch.Tensor]) -> fx.GraphModule:
    """A working copy of ``gated`` without its gates, each gate's values multiplied into the
    parameters of the node it gates (the copy's graph is made without the gate nodes)."""
    gm = gate_free_copy(gated)
    modules = dict(gm.named_modules(remove_duplicate=False))  # every path a parameter may be named by
    nodes = {n.name: n for n in gm.graph.nodes}
    folded: set[tuple[str, int]] = set()
    for node in gate_sites(gated):
        gate = gated.get_submodule(node.target)
        anchor, index, _ = node.args
        v = values[gate.group_id]
        if index is not None:
            v = v[gated.get_buffer(index.target)]
        anchor = nodes[anchor.name]  # a stored tensor gated where it joins the channels folds into itself
        params = [(anchor.target, node.args[2])] if anchor.op == "get_attr" else \
            rule_for(anchor, modules).gate_params(gm, anchor)
        key = (",".join(p for p, _ in params), gate.group_id)
        if key not in folded:
            folded.add(key)
            for qualname, pdim in params:
                path, _, name = qualname.rpartition(".")
                t = getattr(modules[path], name).detach()
                shape = [1] * t.dim()
                shape[pdim] = -1
                set_tensor(modules[path], name, t * v.view(shape).to(t.dtype))
    return gm


def _gated_name(gated: fx.GraphModule) -> dict[str, str]:
    """Name of the node in the gated graph that holds a folded node's value (its gate's output)."""
    return {node.args[0].name: node.name for node in gate_sites(gated)}


def _absorb_layers(gm: fx.GraphModule, cg: ChannelGraph, alive: Alive) -> list[Layer]:
    names = {n.name for n in gm.graph.nodes}
    return [l for l in cg.layers if l.node in names and not alive(l.in_ids).all()]


def _input_dim(layer: Layer, ndim: int) -> int:
    return ndim - 1 if layer.kind == "linear" else 1


def _taps(gated: fx.GraphModule, gm: fx.GraphModule, cg: ChannelGraph, keep: dict[int, np.ndarray],
          plans: list[tuple[fx.Node, fx.Node]]) -> tuple[dict[str, Tap], dict[str, torch.Tensor]]:
    """What to record in the one run of the gated module: the ends of dead branches (whole) and
    the removed input channels of every consumer that loses some, unless ``channel_constants``
    knows them; for those, the summary a recording would have given (value, no spread)."""
    rename = _gated_name(gated)
    gated_nodes = {n.name: n for n in gated.graph.nodes}
    folded_nodes = {n.name: n for n in gm.graph.nodes}
    ends = {rename.get(end.name, end.name) for end, _ in plans}
    taps: dict[str, Tap] = dict.fromkeys(ends)
    known: dict[str, torch.Tensor] = {}
    alive = cg.survivors(keep)
    layers = _absorb_layers(gm, cg, alive)
    constants = channel_constants(gated, cg) if layers else {}
    for layer in layers:
        # The input's rank from the folded graph: in the gated one it may be a gate node, which
        # records no value of its own.
        ndim = len(folded_nodes[layer.node].args[0].meta["fxprune_value"].shape)
        removed = np.nonzero(~alive(layer.in_ids))[0]
        name, dim = gated_nodes[layer.node].args[0].name, _input_dim(layer, ndim)
        taps[name] = (dim, removed.tolist())
        c = constants.get(name)
        if dim == 1 and c is not None and name not in ends and c.numel() == len(layer.in_ids):
            value = c[torch.as_tensor(removed, dtype=torch.long)]
            if not bool(value.isnan().any()):
                known[name] = torch.stack([value, torch.zeros_like(value)])
    return taps, known


def _keep_one_in_dead_groups(gm: fx.GraphModule, cg: ChannelGraph, keep: dict[int, np.ndarray],
                             report: FinalizeReport) -> None:
    """A group with every gate at zero whose branch could not be removed keeps one (zero-valued)
    channel: torch has no 0-channel conv."""
    alive = {n.name for n in gm.graph.nodes}
    for gid, mask in keep.items():
        if not mask.any() and any(site.node in alive for site in cg.groups[gid].sites):
            mask[0] = True
            report.retained.setdefault(gid, "all gates are zero; one zero channel is kept (no removable branch)")
    survives = cg.survivors(keep)
    for layer in cg.layers:  # a live conv/linear needs >= 1 input and output channel
        if layer.node not in alive:
            continue
        for ids in (layer.out_ids, layer.in_ids):
            if len(ids) and not survives(ids).any():
                gid, uid = cg.units.locate(int(ids[0]))
                keep[gid][uid] = True
                survives = cg.survivors(keep)
                report.retained.setdefault(gid, f"'{layer.node}' would have no channels left; one zero channel is kept")


def _absorb_constants(gm: fx.GraphModule, gated: fx.GraphModule, cg: ChannelGraph, keep: dict[int, np.ndarray],
                      recorded: dict[str, torch.Tensor], taps: dict[str, Tap], report: FinalizeReport) -> set[str]:
    """A removed channel may still carry a constant (e.g. a BN shift) into consumers: fold it
    into their bias where that is exact (no zero padding around the constant), else keep it.

    A channel that one consumer cannot absorb stays for every consumer, so the channels to keep
    are settled first (to a fixed point) and only then are biases changed. Returns the qualified
    names of biases this created."""
    gated_nodes = {n.name: n for n in gated.graph.nodes}
    alive = cg.survivors(keep)
    # only consumers whose removed inputs are not all exactly zero have anything to do
    layers = [layer for layer in _absorb_layers(gm, cg, alive)
              if bool(recorded[gated_nodes[layer.node].args[0].name].any())]

    columns: dict[int, tuple[np.ndarray, torch.Tensor, torch.Tensor]] = {}  # by layer, for the current ``alive``

    def removed_columns(layer: Layer) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """Removed input positions of ``layer``, each one's value if it is a constant, and
        whether it is one (from the recorded summaries: first element, largest deviation)."""
        if id(layer) not in columns:
            name = gated_nodes[layer.node].args[0].name
            removed = np.nonzero(~alive(layer.in_ids))[0]
            summary = recorded[name]
            rows = torch.as_tensor(np.searchsorted(np.asarray(taps[name][1]), removed), dtype=torch.long)
            const, spread = summary[0, rows], summary[1, rows]
            columns[id(layer)] = removed, const, spread <= 1e-6 * (1 + const.abs())
        return columns[id(layer)]

    def exact(layer: Layer) -> bool:
        return layer.zero_padding and layer.groups == 1 and layer.kind != "conv_transpose" and layer.module_path is not None

    changed = True
    while changed:  # a pass sees the keep masks as they were when it started
        changed = False
        for layer in layers:
            removed, const, constant = removed_columns(layer)
            if not removed.size:
                continue
            bad = removed[(~constant if exact(layer) else ~constant | (const != 0)).cpu().numpy()]
            g, u = cg.units.lookup(layer.in_ids[bad])
            for gid, uid in zip(g.tolist(), u.tolist()):
                keep[gid][uid] = changed = True
                report.retained[gid] = (f"removed channels feed '{layer.node}' a value it cannot absorb exactly (a "
                                        "non-zero constant through zero padding, or not a constant)")
        if changed:
            alive = cg.survivors(keep)
            columns.clear()
    created: set[str] = set()
    for layer in layers:
        removed, const, _ = removed_columns(layer)
        nonzero = (const != 0).cpu().numpy()
        if nonzero.any():
            created |= _add_to_bias(gm, layer, removed[nonzero], const[torch.as_tensor(nonzero, device=const.device)])
    return created


def _add_to_bias(gm: fx.GraphModule, layer: Layer, cols: np.ndarray, const: torch.Tensor) -> set[str]:
    mod = gm.get_submodule(layer.module_path)
    w = mod.weight.detach()
    # one matrix-vector product over every input (zero where nothing is removed): a third of
    # the time of gathering the removed columns first (61 convs of densenet121)
    inputs = torch.zeros(w.shape[1], dtype=w.dtype, device=w.device)
    inputs[torch.as_tensor(cols, device=w.device)] = const.to(w.dtype)
    contribution = w.reshape(w.shape[0], w.shape[1], -1).sum(-1) @ inputs
    if mod.bias is None:
        mod.bias = nn.Parameter(contribution)
        return {f"{layer.module_path}.bias"}
    replace_tensor(gm, f"{layer.module_path}.bias", mod.bias.detach() + contribution)
    return set()


def _slice_params(gm: fx.GraphModule, cg: ChannelGraph, alive: Alive,
                  extra: dict[tuple[str, int], ParamSlice], created_biases: set[str]) -> None:
    owners = dict(gm.named_modules())  # one walk instead of a get_submodule per tensor
    # the kept positions by survival mask: a layer's weight rows, bias and the norm after it
    # (weight, bias, running statistics) share one, so each is computed once
    positions: dict[bytes, torch.Tensor | None] = {}

    def select(qualname: str, dim: int, mask: np.ndarray) -> None:
        path, _, name = qualname.rpartition(".")
        owner = owners.get(path)
        t = getattr(owner, name, None) if owner is not None else None
        if t is None:  # gone with a dead branch
            return
        key = mask.tobytes()
        if key not in positions:
            positions[key] = None if mask.all() else torch.as_tensor(np.flatnonzero(mask))
        index = positions[key]
        if index is not None:
            set_tensor(owner, name, t.detach().index_select(dim, index))

    for (qualname, dim), ps in {**cg.param_slices, **extra}.items():
        select(qualname, dim, alive(ps.ids))
    for layer in cg.layers:  # biases created while absorbing constants
        qualname = f"{layer.module_path}.bias"
        if layer.module_path and qualname in created_biases:
            mask = alive(layer.out_ids)
            if get_tensor(gm, qualname).shape[0] != mask.sum():
                select(qualname, 0, mask)


def _resize_modules(gm: fx.GraphModule) -> None:
    """Make modules' size attributes agree with their sliced parameters."""
    for mod in gm.modules():
        rule = REGISTRY.module_rule(mod)
        if rule is not None and rule.resize is not None:
            rule.resize(mod)


def _specialize_sizes(gm: fx.GraphModule, cg: ChannelGraph, alive: Alive) -> None:
    """Replace integers read from channel sizes by their traced (dense) values where a removed
    channel would change them; the literal rewrite then gives each consumer the size *its own*
    tensor has. A size read from one tensor thus never reshapes another whose channels differ
    (``(v @ attn).view(B, C, H, W)`` with ``C = x.shape[1]``); sizes of other dims (batch,
    spatial) stay read at run time."""
    nodes = {n.name: n for n in gm.graph.nodes}

    def concrete(a: fx.Node) -> Any:
        size = cg.channel_sizes.get(a.name)
        if size is None or alive(size.ids).all():
            return a
        return _literal(gm, a, size, alive)

    for name in cg.size_uses:
        node = nodes.get(name)
        if node is not None and node.op != "output":
            node.args = map_arg(node.args, concrete)
            node.kwargs = map_arg(node.kwargs, concrete)


def _literal(gm: fx.GraphModule, node: fx.Node, size: SizeOf, alive: Alive) -> Any:
    """The traced value of a size node; for a size tuple only the parts that count removed
    channels become literals, the others stay read at run time."""
    value = node.meta["fxprune_value"]
    if size.parts is None or not isinstance(value, tuple):
        return int(value) if isinstance(value, int) else value
    out = []
    for i, part in enumerate(size.parts):
        if part.ids.size and not alive(part.ids).all():
            out.append(int(value[i]))
        else:
            with gm.graph.inserting_after(node):
                out.append(gm.graph.call_function(operator.getitem, (node, i)))
    return tuple(out)


def _rewrite_literals(gm: fx.GraphModule, cg: ChannelGraph, keep: dict[int, np.ndarray]) -> None:
    """Rewrite graph constants that spell out channel counts of the dense model."""
    rw = Rewrite(gm, cg, keep)
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        rule = rule_for(node, modules)
        if rule is not None and rule.rewrite is not None:
            rule.rewrite(rw, node)


@gc_paused
def finalize(
    module: fx.GraphModule,
    channel_graph: ChannelGraph,
    decision: Decision | None = None,
    rtol: float = 1e-4,
    check: bool = True,
    report: FinalizeReport | None = None,
) -> fx.GraphModule:
    """Carry out ``decision`` for real: remove its removed units, fold its scales, merge its merged
    units' consumer columns into their representatives (``fxprune.decision.merge_consumers``).

    Without a decision, ``module`` is a gated module and its gates are the decision (units at
    exactly 0 go, the other values are folded). The result is checked against the module that
    computes the decision (``module`` itself, or ``apply_decision(module, ...)``). Raises
    ``EquivalenceError`` if they differ on the example inputs recorded by ``fxprune.trace``
    (relative tolerance ``rtol`` on the largest output value), if either output holds NaN/Inf,
    or if the finalized module fails to run (naming the node); ``ConfigError`` for a decision
    that does not fit ``channel_graph`` or a module ``fxprune.trace`` did not make;
    ``AnalysisError`` for a channel graph computed from another module.
    """
    report = report if report is not None else FinalizeReport()
    cg = channel_graph
    if not isinstance(module, fx.GraphModule) or "fxprune_example_inputs" not in module.meta:
        raise ConfigError(f"passes.finalize expects a module made by fxprune.trace (or a gated copy of one), got "
                          f"{type(module).__name__} without its example inputs; trace the model with fxprune.trace")
    cg.check_source(module, "passes.finalize")
    if decision is not None:
        decision = decision.complete(cg)
    gated = module if decision is None else apply_decision(module, cg, decision)
    if decision is not None and decision.merge:  # the reference computes the merged decision
        merge_consumers(gated, cg, decision)
    held = read_gates(gated, cg)  # the reference's gate values: what is folded
    decision = decision if decision is not None else held
    inputs = gated.meta["fxprune_example_inputs"]
    keep = {gid: mask.copy() for gid, mask in decision.keep.items()}
    gm = _folded_copy(gated, held.scale)
    plans = dead_branch_plans(gm, cg, keep)
    taps, known = _taps(gated, gm, cg, keep, plans)
    ref_out, recorded = record(gated, inputs, {name: tap for name, tap in taps.items() if name not in known})
    recorded.update(known)
    rename = _gated_name(gated)
    ends = {end.name: recorded[rename.get(end.name, end.name)] for end, _ in plans}
    constant_slices = remove_dead_branches(gm, cg, plans, ends, report)
    _keep_one_in_dead_groups(gm, cg, keep, report)
    created = _absorb_constants(gm, gated, cg, keep, recorded, taps, report)
    del recorded, ends
    alive = cg.survivors(keep)
    _slice_params(gm, cg, alive, constant_slices, created)
    _resize_modules(gm)
    _specialize_sizes(gm, cg, alive)
    _rewrite_literals(gm, cg, keep)
    eliminate_dead_code(gm)
    gm = materialize(gm)
    unshare(gm, gated)
    for g in cg.groups:
        report.sizes[g.id] = g.size
        report.kept[g.id] = int(keep[g.id].sum())
    report.keep = keep
    if check:
        report.max_abs_diff, report.max_rel_diff = verify_against(gated, ref_out, gm, inputs, rtol=rtol)
    gm.meta["fxprune_example_inputs"] = inputs
    # what fxprune.save writes and fxprune.load replays: the decision, and the graph it applies to
    gm.meta["fxprune_record"] = {"fingerprint": cg.fingerprint(module),
                                 "keep": {g.id: np.nonzero(keep[g.id])[0].tolist() for g in cg.groups
                                          if not keep[g.id].all()}}
    return gm
