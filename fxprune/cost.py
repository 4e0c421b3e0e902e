"""Cost model: MACs and parameters as functions of each group's kept units.

Each is a *resource*: a function from a keep decision to a cost. Budgets limit resources by
name (``CostModel.resources``), so a later resource (predicted latency, weight sparsity) plugs in
beside these two without touching the allocator.

FLOPs here are multiply-accumulates (MACs) of conv and linear layers per example; torch's
``FlopCounterMode`` counts 2 FLOPs per MAC over the whole batch. The same model works on
integer keep masks (exact accounting) and on float tensors of soft keep values in [0, 1]
(differentiable penalties: the bilinear FLOPs of GDP/DSA/DAIS).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.fx as fx

from fxprune.errors import ConfigError
from fxprune.ir import ChannelGraph

Term = tuple[int, list[tuple[int, np.ndarray]]]  # (untracked count, [(group, unit indices)])


def _terms(cg: ChannelGraph, ids: np.ndarray) -> Term:
    g, u = cg.units.lookup(np.asarray(ids).ravel())
    fixed = int((g < 0).sum())
    return fixed, [(int(gid), u[g == gid]) for gid in np.unique(g[g >= 0]).tolist()]


def _count(term: Term, keep: dict) -> float | torch.Tensor:
    fixed, parts = term
    total = fixed
    for gid, units in parts:
        k = keep[gid]
        total = total + (k[torch.as_tensor(units)].sum() if isinstance(k, torch.Tensor) else int(k[units].sum()))
    return total


@dataclass
class _LayerCost:
    macs_per_pair: int
    grouped: bool
    in_per_group: int
    inputs: Term
    outputs: Term


def _layer_macs(l: _LayerCost, keep: dict) -> float | torch.Tensor:
    inp = l.in_per_group if l.grouped else _count(l.inputs, keep)
    return l.macs_per_pair * _count(l.outputs, keep) * inp


@dataclass
class _ParamCost:
    shape: tuple[int, ...]
    dims: dict[int, Term]


class CostModel:
    """MACs (per example) and parameter counts of a traced model under a keep decision."""

    def __init__(self, gm: fx.GraphModule, cg: ChannelGraph):
        """``gm`` is the traced module ``cg`` was computed from (no gates or other additions)."""
        self.cg = cg
        self.gm = gm
        self.layers = [
            _LayerCost(l.macs_per_pair, l.groups > 1, l.in_per_group, _terms(cg, l.in_ids), _terms(cg, l.out_ids))
            for l in cg.layers
        ]
        sliced: dict[str, dict[int, Term]] = {}
        for (qualname, dim), ps in cg.param_slices.items():
            sliced.setdefault(qualname, {})[dim] = _terms(cg, ps.ids)
        self.param_costs = [
            _ParamCost(tuple(p.shape), sliced.get(name, {}))
            for name, p in gm.named_parameters()
        ]
        self.resources: dict[str, Callable[[dict], float | torch.Tensor]] = {"macs": self.macs, "params": self.params}

    def add_resource(self, name: str, fn: Callable[[dict], float | torch.Tensor]) -> None:
        """Limit ``name`` by budgets too: ``fn`` maps a keep decision (bool masks or soft tensors;
        missing groups are whole) to a cost, e.g. a latency predictor's microseconds."""
        self.resources[name] = fn

    def resource(self, name: str) -> Callable[[dict], float | torch.Tensor]:
        try:
            return self.resources[name]
        except KeyError:
            raise ConfigError(f"no resource {name!r} in this cost model; known: {sorted(self.resources)}") from None

    def _complete(self, keep: dict) -> dict:
        out = dict(keep)
        for g in self.cg.groups:
            if g.id not in out:
                out[g.id] = np.ones(g.size, dtype=bool)
        return out

    def macs(self, keep: dict | None = None) -> float | torch.Tensor:
        """Conv + linear MACs per example; ``keep`` maps group -> bool mask or soft tensor."""
        keep = self._complete(keep or {})
        total = 0
        for l in self.layers:
            total = total + _layer_macs(l, keep)
        return total

    def layer_widths(self, keep: dict) -> list[tuple[int, int]]:
        """Kept (input, output) channels of every conv/linear layer (``cg.layers`` order) under
        ``keep`` (bool masks; missing groups whole). A grouped layer's input is its full
        per-group fan-in times its groups."""
        keep = self._complete(keep)
        return [(l.in_per_group * layer.groups if l.grouped else int(_count(l.inputs, keep)), int(_count(l.outputs, keep)))
                for layer, l in zip(self.cg.layers, self.layers)]

    def starved(self, keep: dict) -> list[list[tuple[int, np.ndarray]]]:
        """The channels, as ``[(group, unit indices), ...]``, of every conv/linear input or output
        that ``keep`` (bool masks; missing groups whole) removes entirely: finalize would have to
        keep one of them as a zero channel (torch has no 0-channel conv), at a cost the decision
        did not count. A group keeps >= 1 unit, but a layer may read only part of a group (after a
        split or a channel shuffle)."""
        keep = self._complete(keep)
        out = []
        for l in self.layers:
            for fixed, parts in ((l.outputs,) if l.grouped else (l.inputs, l.outputs)):
                if parts and not fixed and not any(keep[gid][units].any() for gid, units in parts):
                    out.append(parts)
        return out

    def weight_macs(self) -> dict[str, int]:
        """Dense MACs per example of the layers that use each conv/linear weight (by its qualified
        name; a shared weight sums its layers): a weight's share of them is its density."""
        out: dict[str, int] = {}
        keep = self._complete({})
        for layer, l in zip(self.cg.layers, self.layers):
            out[layer.weight] = out.get(layer.weight, 0) + int(_layer_macs(l, keep))
        return out

    def params(self, keep: dict | None = None) -> float | torch.Tensor:
        """Number of parameters (buffers such as BN statistics are not counted)."""
        keep = self._complete(keep or {})
        total = 0
        for p in self.param_costs:
            n = 1
            for d, size in enumerate(p.shape):
                n = n * (_count(p.dims[d], keep) if d in p.dims else size)
            total = total + n
        return total

    def quadratic(self, name: str, groups: list[int]) -> tuple[np.ndarray, np.ndarray, float]:
        """``name`` ("macs" or "params") as an exact quadratic form of one keep fraction per group
        of ``groups`` (the other groups whole): cost(x) = x^T A x + B x + c when every unit of
        group ``groups[k]`` is kept with the fraction ``x[k]`` (DSA's budget model). Built from the
        same layer and parameter terms as ``macs``/``params``, so the two always agree. Raises
        ``ConfigError`` for another resource or a parameter with more than two tracked dims."""
        index = {gid: k for k, gid in enumerate(groups)}

        def affine(term: Term) -> tuple[float, np.ndarray]:
            fixed, parts = term
            const, lin = float(fixed), np.zeros(len(groups))
            for gid, units in parts:
                if gid in index:
                    lin[index[gid]] += len(units)
                else:
                    const += len(units)
            return const, lin

        forms: list[tuple[float, list[tuple[float, np.ndarray]]]] = []
        if name == "macs":
            for l in self.layers:
                inp = (float(l.in_per_group), np.zeros(len(groups))) if l.grouped else affine(l.inputs)
                forms.append((float(l.macs_per_pair), [affine(l.outputs), inp]))
        elif name == "params":
            for p in self.param_costs:
                fixed = float(np.prod([s for d, s in enumerate(p.shape) if d not in p.dims]))
                forms.append((fixed, [affine(p.dims[d]) for d in sorted(p.dims)]))
        else:
            raise ConfigError(f"resource {name!r} has no quadratic form; only 'macs' and 'params' do")
        a, b, c = np.zeros((len(groups), len(groups))), np.zeros(len(groups)), 0.0
        for scale, factors in forms:
            if len(factors) > 2:
                raise ConfigError(f"resource {name!r}: a parameter with {len(factors)} tracked dims is not quadratic "
                                  "in the keep fractions")
            if not factors:
                c += scale
            elif len(factors) == 1:
                c += scale * factors[0][0]
                b += scale * factors[0][1]
            else:
                (c0, v0), (c1, v1) = factors
                c += scale * c0 * c1
                b += scale * (c0 * v1 + c1 * v0)
                a += scale * (np.outer(v0, v1) + np.outer(v1, v0)) / 2
        return a, b, c

    def floor(self, min_units: dict[int, int]) -> dict[str, int]:
        """Every resource with each prunable group cut to ``min_units`` units (its smallest)."""
        keep = {}
        for g in self.cg.prunable_groups:
            mask = np.zeros(g.size, dtype=bool)
            mask[: min_units.get(g.id, 1)] = True
            keep[g.id] = mask
        return {name: int(f(keep)) for name, f in self.resources.items()}


def count_macs(model: torch.nn.Module, example_inputs) -> int:
    """Measured MACs per example of a (pruned or dense) model: trace it and count every layer.
    Raises what ``fxprune.trace`` raises (``ConfigError``, ``TraceError``)."""
    from fxprune.analysis import analyze
    from fxprune.tracing import trace

    gm = trace(model, example_inputs)
    return int(CostModel(gm, analyze(gm)).macs())
