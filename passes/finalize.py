"""finalize: gated GraphModule -> plain, physically smaller GraphModule computing the same thing.

Steps, each a small function below: read the gates' decisions; fold every gate value into the
node it gates; absorb the constant a removed channel still feeds into a consumer into that
consumer's bias; remove dead residual branches; slice every listed parameter and buffer; fix
the module attributes and graph literals (group counts, split sizes, view shapes) that name
channel counts; then check the result against the gated module.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from fxprune.ir import ChannelGraph, ChannelMap, Layer
from fxprune.ops import BATCHNORM_MODULES
from fxprune.passes.branches import remove_dead_branches
from fxprune.passes.gates import GATE_ROOT, gate_sites
from fxprune.passes.verify import check_equivalence, record_values


@dataclass
class FinalizeReport:
    """What finalize did, for the compile report."""

    kept: dict[int, int] = field(default_factory=dict)  # group id -> kept units
    sizes: dict[int, int] = field(default_factory=dict)
    retained: dict[int, str] = field(default_factory=dict)  # group -> why units were kept anyway
    removed_branches: list[str] = field(default_factory=list)
    max_abs_diff: float = 0.0
    max_rel_diff: float = 0.0


def _decisions(gm: fx.GraphModule, cg: ChannelGraph) -> tuple[dict[int, np.ndarray], dict[int, torch.Tensor]]:
    values: dict[int, torch.Tensor] = {}
    for node in gate_sites(gm):
        gate = gm.get_submodule(node.target)
        values[gate.group_id] = gate.values().detach().float()
    keep = {gid: (v != 0).numpy() for gid, v in values.items()}
    return cg.keep_masks(keep), values


def _fold_gates(gm: fx.GraphModule, values: dict[int, torch.Tensor]) -> None:
    """Multiply each gate into the parameters of the node it gates, then drop the gate."""
    modules = dict(gm.named_modules())
    folded: set[tuple[str, int]] = set()
    for node in gate_sites(gm):
        gate = modules[node.target]
        anchor, index, dim = node.args
        v = values[gate.group_id]
        if index is not None:
            v = v[gm.get_buffer(index.target)]
        params = _output_params(gm, anchor)
        key = (",".join(p for p, _ in params), gate.group_id)
        if key not in folded:
            folded.add(key)
            for qualname, pdim in params:
                t = _get(gm, qualname)
                shape = [1] * t.dim()
                shape[pdim] = -1
                with torch.no_grad():
                    t.mul_(v.view(shape).to(t.dtype))
        node.replace_all_uses_with(anchor)
        gm.graph.erase_node(node)
        if index is not None:
            gm.graph.erase_node(index)
    if hasattr(gm, GATE_ROOT):
        delattr(gm, GATE_ROOT)


def _output_params(gm: fx.GraphModule, node: fx.Node) -> list[tuple[str, int]]:
    """Parameters that scale ``node``'s output channels linearly, with their channel dim."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, BATCHNORM_MODULES):
            names, dim = ("weight", "bias"), 0
        elif isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            return [(f"{node.target}.weight", 1)] + ([(f"{node.target}.bias", 0)] if mod.bias is not None else [])
        else:
            names, dim = ("weight", "bias"), 0
        return [(f"{node.target}.{n}", dim) for n in names if getattr(mod, n, None) is not None]
    w, b = node.args[1], node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return [(a.target, 0) for a in (w, b) if isinstance(a, fx.Node)]


def _get(gm: fx.GraphModule, qualname: str) -> torch.Tensor:
    path, _, name = qualname.rpartition(".")
    return getattr(gm.get_submodule(path), name)


def _set(gm: fx.GraphModule, qualname: str, value: torch.Tensor) -> None:
    path, _, name = qualname.rpartition(".")
    mod = gm.get_submodule(path)
    old = getattr(mod, name)
    if isinstance(old, nn.Parameter):
        setattr(mod, name, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        setattr(mod, name, value)


def _absorb_constants(gm: fx.GraphModule, cg: ChannelGraph, keep: dict[int, np.ndarray], report: FinalizeReport) -> None:
    """A removed channel may still carry a constant (e.g. a BN shift) into consumers: fold it
    into their bias where that is exact (no zero padding around the constant), else keep it."""
    alive = {n.name for n in gm.graph.nodes}
    layers = [l for l in cg.layers if l.node in alive and not cg.kept_positions(l.in_ids, keep).all()]
    if not layers:
        return
    recorded = record_values(gm, {l.node for l in layers}, arg=True)
    for layer in layers:
        x = recorded[layer.node]
        dim = 1 if layer.kind != "linear" else x.dim() - 1
        removed = np.nonzero(~cg.kept_positions(layer.in_ids, keep))[0]
        cols = x.movedim(dim, 0)[torch.as_tensor(removed)].reshape(len(removed), -1)
        if not bool(cols.any()):
            continue
        const = cols[:, 0]
        constant = (cols - const[:, None]).abs().amax(1) <= 1e-6 * (1 + const.abs())
        nonzero = const != 0
        exact = layer.zero_padding and layer.groups == 1 and layer.kind != "conv_transpose" and layer.module_path is not None
        if exact and bool(constant[nonzero].all()):
            _add_to_bias(gm, layer, removed[nonzero.numpy()], const[nonzero])
            continue
        bad = removed[(nonzero & ~(constant & torch.tensor(exact))).numpy()]
        g, u = cg.units.lookup(layer.in_ids[bad])
        for gid, uid in zip(g.tolist(), u.tolist()):
            keep[gid][uid] = True
            report.retained[gid] = f"removed channels feed a non-zero constant into '{layer.node}', which cannot absorb it exactly"


def _add_to_bias(gm: fx.GraphModule, layer: Layer, cols: np.ndarray, const: torch.Tensor) -> None:
    mod = gm.get_submodule(layer.module_path)
    w = mod.weight.detach()[:, torch.as_tensor(cols)]
    contribution = (w.reshape(w.shape[0], len(cols), -1).sum(-1) * const.to(w.dtype)).sum(1)
    if mod.bias is None:
        mod.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype))
        layer.bias = f"{layer.module_path}.bias"
    with torch.no_grad():
        mod.bias.add_(contribution)


def _slice_params(gm: fx.GraphModule, cg: ChannelGraph, keep: dict[int, np.ndarray]) -> None:
    for (qualname, dim), ps in cg.param_slices.items():
        try:
            t = _get(gm, qualname)
        except AttributeError:
            continue  # removed together with a dead branch
        mask = cg.kept_positions(ps.ids, keep)
        if mask.all():
            continue
        idx = torch.as_tensor(np.nonzero(mask)[0])
        _set(gm, qualname, t.detach().index_select(dim, idx).clone())
    for layer in cg.layers:  # biases created while absorbing constants
        if layer.bias and (layer.bias, 0) not in cg.param_slices and layer.module_path:
            mask = cg.kept_positions(layer.out_ids, keep)
            t = _get(gm, layer.bias)
            if t.shape[0] != mask.sum():
                _set(gm, layer.bias, t.detach()[torch.as_tensor(np.nonzero(mask)[0])].clone())


def _fix_module_attributes(gm: fx.GraphModule) -> None:
    """Make modules' size attributes agree with their sliced parameters."""
    for mod in gm.modules():
        if isinstance(mod, nn.modules.conv._ConvNd):
            w = mod.weight
            per_out = mod.out_channels // mod.groups
            if mod.transposed:
                mod.in_channels = w.shape[0]
                mod.groups = max(1, w.shape[0] // (mod.in_channels // mod.groups)) if mod.groups > 1 else 1
                mod.out_channels = w.shape[1] * mod.groups
            else:
                mod.out_channels = w.shape[0]
                mod.groups = w.shape[0] // per_out if mod.groups > 1 else 1
                mod.in_channels = w.shape[1] * mod.groups
        elif isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = mod.weight.shape
        elif isinstance(mod, nn.modules.batchnorm._NormBase):
            ref = mod.weight if mod.weight is not None else mod.running_mean
            if ref is not None:
                mod.num_features = ref.shape[0]
        elif isinstance(mod, nn.GroupNorm) and mod.weight is not None:
            per = mod.num_channels // mod.num_groups
            mod.num_channels = mod.weight.shape[0]
            mod.num_groups = mod.num_channels // per
        elif isinstance(mod, nn.PReLU):
            mod.num_parameters = mod.weight.shape[0]


def _kept_count(cg: ChannelGraph, ids: np.ndarray, keep: dict[int, np.ndarray]) -> int:
    return int(cg.kept_positions(ids, keep).sum())


def _rewrite_literals(gm: fx.GraphModule, cg: ChannelGraph, keep: dict[int, np.ndarray]) -> None:
    """Rewrite graph constants that spell out channel counts of the dense model."""
    for node in list(gm.graph.nodes):
        out = cg.node_maps.get(node.name)
        x = node.args[0] if node.args else None
        xm = cg.node_maps.get(x.name) if isinstance(x, fx.Node) else None
        if node.op in ("call_method", "call_function") and node.target in ("split", "chunk", torch.split, torch.chunk, torch.tensor_split):
            if isinstance(out, tuple) and isinstance(xm, ChannelMap) and len(xm.dims) == 1 and out and out[0].dims == xm.dims:
                sizes = [_kept_count(cg, m.ids, keep) for m in out]
                with gm.graph.inserting_before(node):
                    new = gm.graph.call_function(torch.split, (x, sizes), {"dim": xm.dims[0]})
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
        elif node.op == "call_function" and node.target is operator.getitem and isinstance(xm, ChannelMap):
            node.args = (x, _rewrite_index(node.args[1], xm, cg, keep, len(node.args[0].meta["fxprune_value"].shape)))
        elif isinstance(out, ChannelMap) and node.op == "call_method" and node.target in ("view", "reshape", "expand"):
            node.args = (x,) + _rewrite_sizes(node.args[1:], out, cg, keep)
        elif isinstance(out, ChannelMap) and node.op == "call_function" and node.target is torch.reshape:
            node.args = (x,) + _rewrite_sizes(node.args[1:], out, cg, keep)
        elif node.op == "call_function" and node.target in (torch.conv1d, torch.conv2d, torch.conv3d,
                                                               torch.nn.functional.conv1d, torch.nn.functional.conv2d,
                                                               torch.nn.functional.conv3d):
            _rewrite_functional_groups(gm, node)


def _rewrite_index(index: Any, xm: ChannelMap, cg: ChannelGraph, keep: dict[int, np.ndarray], ndim: int) -> Any:
    items = list(index) if isinstance(index, tuple) else [index]
    kept = cg.kept_positions(xm.ids, keep) if len(xm.dims) == 1 else None
    if kept is None:
        return index
    d_channel = xm.dims[0]
    pos = 0
    for i, e in enumerate(items):
        if e is None:
            continue
        if e is Ellipsis:
            pos += ndim - sum(1 for v in items if v is not None and v is not Ellipsis)
            continue
        if pos == d_channel and isinstance(e, slice) and e != slice(None):
            start, stop, _ = e.indices(len(kept))
            items[i] = slice(int(kept[:start].sum()), int(kept[:stop].sum()), e.step)
        pos += 1
    return tuple(items) if isinstance(index, tuple) else items[0]


def _rewrite_sizes(sizes: tuple, out: ChannelMap, cg: ChannelGraph, keep: dict[int, np.ndarray]) -> tuple:
    flat = list(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)) else list(sizes)
    kept = cg.kept_positions(out.ids.ravel(), keep).reshape(out.ids.shape)
    for axis, d in enumerate(out.dims):
        if d < len(flat) and isinstance(flat[d], int) and flat[d] != -1:
            other = tuple(a for a in range(kept.ndim) if a != axis)
            flat[d] = int(kept.any(axis=other).sum()) if other else int(kept.sum())
    return (tuple(flat),) if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)) else tuple(flat)


def _rewrite_functional_groups(gm: fx.GraphModule, node: fx.Node) -> None:
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    if not isinstance(groups, int) or groups == 1:
        return
    weight = _get(gm, node.args[1].target)
    dense_out = node.meta["fxprune_value"].shape[1]
    new = weight.shape[0] // (dense_out // groups)
    if len(node.args) > 6:
        node.args = node.args[:6] + (new,) + node.args[7:]
    else:
        node.kwargs = {**node.kwargs, "groups": new}


def _keep_one_in_dead_groups(gm: fx.GraphModule, cg: ChannelGraph, keep: dict[int, np.ndarray],
                             report: FinalizeReport) -> None:
    """A group with every gate at zero whose branch could not be removed keeps one (zero-valued)
    channel: torch has no 0-channel conv."""
    alive = {n.name for n in gm.graph.nodes}
    for gid, mask in keep.items():
        if not mask.any() and any(site.node in alive for site in cg.groups[gid].sites):
            mask[0] = True
            report.retained.setdefault(gid, "all gates are zero; one zero channel is kept (no removable branch)")
    # A live conv/linear needs >= 1 input and output channel: keep one (zero-valued) unit there.
    for layer in cg.layers:
        if layer.node not in alive:
            continue
        for ids in (layer.out_ids, layer.in_ids):
            if len(ids) and not cg.kept_positions(ids, keep).any():
                gid, uid = cg.units.locate(int(ids[0]))
                keep[gid][uid] = True
                report.retained.setdefault(gid, f"'{layer.node}' would have no channels left; one zero channel is kept")


def finalize(
    gated: fx.GraphModule,
    channel_graph: ChannelGraph,
    rtol: float = 1e-4,
    check: bool = True,
    report: FinalizeReport | None = None,
) -> fx.GraphModule:
    """Physically remove every channel whose gate is exactly 0 and fold the other gate values.

    Raises ``EquivalenceError`` if the result does not match ``gated`` on the example inputs
    recorded by ``fxprune.trace`` (relative tolerance ``rtol`` on the largest output value).
    """
    report = report if report is not None else FinalizeReport()
    gm = copy.deepcopy(gated)
    gm.eval()
    cg = copy.deepcopy(channel_graph)  # biases created by absorption are recorded on its layers
    keep, values = _decisions(gm, cg)
    _fold_gates(gm, values)
    gm.recompile()
    remove_dead_branches(gm, cg, keep, report)
    _keep_one_in_dead_groups(gm, cg, keep, report)
    _absorb_constants(gm, cg, keep, report)
    _slice_params(gm, cg, keep)
    _fix_module_attributes(gm)
    _rewrite_literals(gm, cg, keep)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.train(gated.training)
    for g in cg.groups:
        report.sizes[g.id] = g.size
        report.kept[g.id] = int(keep[g.id].sum())
    if check:
        diff = check_equivalence(gated, gm, gated.meta["fxprune_example_inputs"], rtol=rtol)
        report.max_abs_diff, report.max_rel_diff = diff
    gm.meta["fxprune_example_inputs"] = gated.meta["fxprune_example_inputs"]
    return gm

