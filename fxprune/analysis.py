"""analyze: fx.GraphModule -> ChannelGraph.

One small interpreter over the traced graph (compare torch/fx/passes/shape_prop.py). For each
node it asks the op's rule (``fxprune.rules``) to map the inputs' ChannelMaps to the output's;
rules record which parameter dims hold which channels and unite the channel ids that ops couple.
This module keeps only what every rule shares: the walk, the union-find over channel ids, and
group assembly. Ops without a rule make the channels they touch unprunable, with the node and op
as the reason: conservative, never wrong.

Integers read from a tracked channel extent (``x.shape[1]``, ``x.size(1) // 2``) are followed as
well: the graph records which nodes they reach (``ChannelGraph.channel_sizes``), and finalize
replaces them by the values the pruned graph needs, so a size read from one tensor can never
reshape another (see passes/finalize.py).

    >>> import torch, torch.nn as nn, fxprune
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    >>> cg = fxprune.analyze(fxprune.trace(net, (torch.randn(1, 3, 8, 8),)))
    >>> [(g.size, g.prunable) for g in cg.groups]
    [(8, True), (4, False)]
"""
from __future__ import annotations

import operator
from typing import Any

import networkx as nx
import numpy as np
import torch
import torch.fx as fx
from torch.fx.node import map_aggregate

from fxprune import rules as _rules  # noqa: F401  (registers fxprune's own op rules)
from fxprune.errors import AnalysisError
from fxprune.gcpause import gc_paused
from fxprune.ir import (
    ChannelGraph, ChannelGroup, ChannelMap, Layer, ParamSlice, SizeOf, Site, SliceSpec, UnitTable, node_signature,
)
from fxprune.rules.base import REGISTRY, Category, arg, gate_anchor, op_name, rule_for
from fxprune.rules.combine import PRODUCTS, SUMS
from fxprune.rules.pointwise import zero_at_zero
from fxprune.tracing import TensorMeta



def maps_in(struct: Any) -> list[ChannelMap]:
    """Every ChannelMap inside a nested structure."""
    out: list[ChannelMap] = []
    map_aggregate(struct, lambda v: out.append(v) if isinstance(v, ChannelMap) else None)
    return out


def _sizes_in(struct: Any) -> list[SizeOf]:
    out: list[SizeOf] = []
    map_aggregate(struct, lambda v: out.append(v) if isinstance(v, SizeOf) else None)
    return out


def _holds_tensor(value: Any) -> bool:
    found: list[bool] = []
    map_aggregate(value, lambda v: found.append(True) if isinstance(v, TensorMeta) else None)
    return bool(found)


class Walk:
    """The state every op rule works on; rules call these methods, nothing else.

    - ``map(x)``: the channel map (or nested structure, or ``SizeOf``) of node ``x``;
      ``meta(x)``: its traced value (TensorMeta for tensors); ``module(node)``: its module.
    - ``fresh(n, node)``: ``n`` new channel ids produced by ``node``.
    - ``couple(a, b, where)``: ids ``a[i]`` and ``b[i]`` become one unit.
    - ``bind(param, dim, ids, where)``: dim ``dim`` of a parameter/buffer holds channels ``ids``.
    - ``block(struct, reason)`` / ``opaque(node, why)``: make channels unprunable.
    - ``add_layer(layer)``, ``add_site(node, dim, ids)``: conv/linear bookkeeping for the cost
      model and gate placement.
    """

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.leaf_reasons: dict[str, str] = gm.meta.get("fxprune_leaf_modules", {})
        self.parent = np.zeros(0, dtype=np.int64)
        self._size = 0
        self.space_of: list[int] = []
        self.spaces: list[str] = []
        self.blocked: dict[int, str] = {}
        self.param_slices: dict[tuple[str, int], ParamSlice] = {}
        self.layers: list[Layer] = []
        self.sites: list[tuple[str, int, np.ndarray]] = []
        self.env: dict[fx.Node, Any] = {}
        self.channel_sizes: dict[str, np.ndarray] = {}
        self.size_uses: set[str] = set()
        self._gated: tuple[int, set[fx.Node]] = (-1, set())  # where gates sit, for that many sites

    # ---- what rules read -------------------------------------------------------------------
    def map(self, node: Any) -> Any:
        return self.env.get(node) if isinstance(node, fx.Node) else None

    @staticmethod
    def meta(node: Any) -> Any:
        return node.meta.get("fxprune_value") if isinstance(node, fx.Node) else node

    def is_tensor(self, node: Any) -> bool:
        return isinstance(node, fx.Node) and isinstance(self.meta(node), TensorMeta)

    def module(self, node: fx.Node) -> torch.nn.Module:
        return self.modules[node.target]

    def inputs(self, node: fx.Node) -> Any:
        return map_aggregate((node.args, node.kwargs), lambda a: self.env.get(a) if isinstance(a, fx.Node) else None)

    # ---- union-find over channel ids ---------------------------------------------------------
    def fresh(self, n: int, node: fx.Node) -> np.ndarray:
        start = self._size
        if start + n > len(self.parent):
            grown = np.arange(max(2 * len(self.parent), start + n, 64), dtype=np.int64)
            grown[:start] = self.parent[:start]
            self.parent = grown
        self._size += n
        self.space_of.extend([len(self.spaces)] * n)
        self.spaces.append(node.name)
        return np.arange(start, start + n, dtype=np.int64)

    def roots(self, ids: np.ndarray) -> np.ndarray:
        """Vectorised ``find`` (with path compression) for an array of tracked ids."""
        ids = np.asarray(ids, dtype=np.int64)
        r = ids.copy()
        while True:
            nxt = self.parent[r]
            if np.array_equal(nxt, r):
                break
            r = nxt
        self.parent[ids] = r
        return r

    def couple(self, a: np.ndarray, b: np.ndarray, where: str) -> None:
        """Unite a and b position by position; a tracked id meeting an untracked one is blocked."""
        a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
        both = (a >= 0) & (b >= 0)
        for x in np.concatenate([a[(a >= 0) & (b < 0)], b[(b >= 0) & (a < 0)]]).tolist():
            self.blocked.setdefault(int(x), f"coupled with untracked channels at {where}")
        if not both.any():
            return
        a, b = a[both], b[both]
        ra, rb = self.roots(a), self.roots(b)
        while True:  # link differing roots downwards until every pair shares one
            differ = ra != rb
            if not differ.any():
                return
            np.minimum.at(self.parent, np.maximum(ra, rb)[differ], np.minimum(ra, rb)[differ])
            ra, rb = self.roots(a), self.roots(b)

    def block(self, struct: Any, reason: str) -> None:
        for m in maps_in(struct):
            for cid in np.unique(m.ids[m.ids >= 0]).tolist():
                self.blocked.setdefault(int(cid), reason)

    def opaque(self, node: fx.Node, why: str) -> None:
        """Block every channel flowing into ``node``; the result is untracked (returns None)."""
        self.block(self.inputs(node), f"{why} at node '{node.name}'")
        return None

    def bind(self, qualname: str, dim: int, ids: np.ndarray, where: str) -> None:
        """Record that dim ``dim`` of parameter/buffer ``qualname`` holds channels ``ids``."""
        key = (qualname, dim)
        if key in self.param_slices:
            old = self.param_slices[key]
            if old.ids.shape != ids.shape:
                self.block(ChannelMap((0,), ids), f"{qualname} used with another shape at {where}")
                self.block(ChannelMap((0,), old.ids), f"{qualname} used with another shape at {where}")
                return
            self.couple(old.ids, ids, where)
            return
        path, _, name = qualname.rpartition(".")
        self.param_slices[key] = ParamSlice(path, name, dim, ids.copy())

    def removed_are_zero(self, node: fx.Node) -> bool:
        """In the gated model, are ``node``'s removed channels exactly zero? At a gate (where a
        producer's gate sits: after its norm when that is the sole user) and through ops that keep
        a zero channel zero: data movement, activations with f(0) = 0, pooling and reductions over
        other dims, a product with such an operand, a sum or concatenation of such operands."""
        if self._gated[0] != len(self.sites):  # the producers upstream of ``node`` are all known
            nodes = {n.name: n for n in self.gm.graph.nodes}
            self._gated = (len(self.sites), {gate_anchor(self.gm, nodes[s], self.modules) for s, _, _ in self.sites})
        gated, memo = self._gated[1], {}

        def zero(n: Any) -> bool:
            if not isinstance(n, fx.Node):
                return False
            if n in gated:
                return True
            if n not in memo:
                rule = rule_for(n, self.modules)
                tensors = [a for a in n.args if self.is_tensor(a)]
                if rule is not None and rule.category is Category.CONCAT and n.args:
                    memo[n] = all(zero(a) for a in n.args[0])
                elif rule is None or not n.args:
                    memo[n] = False
                elif rule.category is Category.MOVEMENT or zero_at_zero(n, self.modules) or (
                        rule.category in (Category.SPATIAL, Category.REDUCE) and rule.keeps_zero is not None
                        and rule.keeps_zero(n, self.modules)):
                    memo[n] = zero(n.args[0])
                elif n.target in PRODUCTS:
                    memo[n] = any(zero(a) for a in tensors)
                elif n.target in SUMS:
                    memo[n] = bool(tensors) and all(zero(a) for a in tensors)
                else:
                    memo[n] = False
            return memo[n]

        return zero(node)

    def add_layer(self, layer: Layer) -> None:
        self.layers.append(layer)

    def add_site(self, node: str, dim: int, ids: np.ndarray) -> None:
        """Gate ``node``'s output along ``dim`` (a producer, or a stored tensor added into the
        channels); a node already gated there is not gated twice."""
        if not any(n == node and d == dim for n, d, _ in self.sites):
            self.sites.append((node, dim, ids))

    # ---- helpers shared by several rules ---------------------------------------------------
    def channel_map(self, node: fx.Node, x: Any, dim: int = 1) -> ChannelMap | None:
        """The map of ``x`` if its channels lie on ``dim`` alone; otherwise block it, None."""
        xm = self.map(x)
        if xm is not None and xm.dims != (dim,):
            self.block(xm, f"{op_name(node)} at '{node.name}' expects channels on dim {dim}, found dims {xm.dims}")
            return None
        return xm

    def input_ids(self, node: fx.Node, x: Any, dim: int) -> np.ndarray:
        """Channel id per position of ``x`` along ``dim`` (-1 where untracked)."""
        xm = self.channel_map(node, x, dim)
        return xm.ids if xm is not None else np.full(self.meta(x).shape[dim], -1, dtype=np.int64)

    def param_shape(self, node: fx.Node, qualname: str) -> tuple[int, ...] | None:
        """Shape of a parameter or buffer, or None if ``qualname`` names neither (a
        parametrization computes it, say): then the caller treats the op as opaque."""
        try:
            return tuple(self.gm.get_parameter(qualname).shape)
        except AttributeError:
            try:
                return tuple(self.gm.get_buffer(qualname).shape)
            except AttributeError:
                return None

    # ---- the walk ------------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                self.env[node] = None
            elif node.op == "output":
                self._note_sizes(node)
                self.block(self.inputs(node), f"reaches the graph output ({node.name})")
            else:
                self.env[node] = self._step(node)

    def _note_sizes(self, node: fx.Node) -> None:
        """``node`` consumes an integer read from a tracked channel extent."""
        if any(s.ids.size for s in _sizes_in(self.inputs(node))):
            self.size_uses.add(node.name)

    def _step(self, node: fx.Node) -> Any:
        rule = rule_for(node, self.modules)
        if rule is not None and rule.category is Category.PRODUCER:
            self._note_sizes(node)
            return rule.propagate(self, node)
        inputs = self.inputs(node)
        sizes = [s for s in _sizes_in(inputs) if s.ids.size]
        if sizes and not _holds_tensor(self.meta(node)):
            return self._size_arithmetic(node, sizes)
        if sizes:
            self.size_uses.add(node.name)
        if not maps_in(inputs):
            return None  # nothing tracked flows in: whatever the op is, its result cannot change
        if rule is None:
            return self._unknown(node, inputs)
        out = rule.propagate(self, node)
        if isinstance(out, SizeOf):
            if not out.ids.size:
                return None
            self.channel_sizes[node.name] = out
        return out

    def _size_arithmetic(self, node: fx.Node, sizes: list[SizeOf]) -> SizeOf | None:
        """Python values computed from channel sizes (``c // 2``, ``shape[1]``) stay channel sizes;
        indexing a size tuple keeps only the indexed dims' dependence (the batch size read from
        ``x.shape[0]`` is not a channel size)."""
        base = self.map(node.args[0]) if node.args else None
        if node.op == "call_function" and node.target is operator.getitem and isinstance(base, SizeOf):
            out = base.index(node.args[1])
        else:
            out = SizeOf(np.unique(np.concatenate([s.ids for s in sizes])))
        if not out.ids.size:
            return None
        self.channel_sizes[node.name] = out
        return out

    def _unknown(self, node: fx.Node, inputs: Any) -> None:
        reason = f"{op_name(node)} at node '{node.name}' is not understood by the channel analysis"
        if node.op == "call_module":
            mod = self.modules[node.target]
            reason = f"opaque module '{node.target}' ({type(mod).__name__}) at node '{node.name}'"
            if node.target in self.leaf_reasons:
                reason += f": it could not be traced ({self.leaf_reasons[node.target]})"
            base = REGISTRY.resolve(type(mod))[1]
            if base is not None:  # a registered base whose rule the subclass does not get
                reason += (f"; it subclasses {base.__name__} but overrides what {base.__name__}'s forward runs, "
                           f"so {base.__name__}'s rule does not apply to it")
        reason += "; fxprune.register_op teaches fxprune a custom op"
        self.block(inputs, reason)
        return None

    # ---- group assembly -------------------------------------------------------------------------
    def result(self) -> ChannelGraph:
        n = self._size
        roots = self.roots(np.arange(n, dtype=np.int64)) if n else np.zeros(0, np.int64)
        space_of = np.asarray(self.space_of, dtype=np.int64)
        uniq, first_index, inverse = _distinct(roots, n)
        # Spaces sharing a unit are one group: connect each space to the first space of its roots.
        first_space_of_root = np.empty(n, dtype=np.int64)
        first_space_of_root[roots[first_index]] = space_of[first_index]
        linked = first_space_of_root[roots] if n else np.zeros(0, np.int64)
        differ = linked != space_of
        spaces = max(len(self.spaces), 1)  # an edge (a, b) as one integer: a 1-D unique, not a row-wise one
        codes = np.unique(linked[differ] * spaces + space_of[differ])
        edges = np.stack([codes // spaces, codes % spaces], axis=1)
        coupling = nx.Graph()
        coupling.add_nodes_from(range(len(self.spaces)))
        coupling.add_edges_from((int(a), int(b)) for a, b in edges)
        components = sorted((sorted(c) for c in nx.connected_components(coupling)), key=lambda c: c[0])
        group_of_space = np.empty(len(self.spaces), dtype=np.int64)
        for gid, comp in enumerate(components):
            group_of_space[comp] = gid
        group_of = group_of_space[space_of] if n else np.zeros(0, np.int64)
        # Units: roots numbered per group in order of first appearance.
        unit_of = np.empty(n, dtype=np.int64)
        sizes = [0] * len(components)
        if n:
            order = np.argsort(first_index, kind="stable")
            root_groups = group_of[first_index[order]]
            by_group = np.argsort(root_groups, kind="stable")  # keeps first-appearance order within a group
            sorted_groups = root_groups[by_group]
            unit_of_root = np.empty(len(uniq), dtype=np.int64)
            unit_of_root[order[by_group]] = np.arange(len(uniq)) - np.searchsorted(sorted_groups, sorted_groups)
            unit_of = unit_of_root[inverse]
            sizes = np.bincount(root_groups, minlength=len(components)).tolist()
        units = UnitTable(group_of, unit_of)
        reasons: dict[int, str] = {}
        for cid, why in sorted(self.blocked.items()):
            reasons.setdefault(int(group_of[cid]), why)
        groups = []
        for gid, comp in enumerate(components):
            reason = reasons.get(gid)
            if reason is None and sizes[gid] < 2:
                reason = "a single channel (a group never drops below one channel)"
            groups.append(ChannelGroup(gid, sizes[gid], reason is None, reason,
                                       spaces=[self.spaces[s] for s in comp]))
        for node, dim, ids in self.sites:
            g, u = units.lookup(ids)
            groups[int(g[0])].sites.append(Site(node, dim, u))
        self._add_slices(units, groups)
        coupling = nx.relabel_nodes(coupling, {i: s for i, s in enumerate(self.spaces)})
        node_maps = {n.name: v for n, v in self.env.items() if v is not None and not isinstance(v, SizeOf)}
        return ChannelGraph(groups, units, self.layers, self.param_slices, node_maps, coupling, reasons,
                            channel_sizes=dict(self.channel_sizes), size_uses=set(self.size_uses),
                            source={n.name: node_signature(n) for n in self.gm.graph.nodes})

    def _add_slices(self, units: UnitTable, groups: list[ChannelGroup]) -> None:
        """Each parameter slice to the groups whose units it holds. All slices are looked up at
        once and the common case (one group holds the whole slice) needs no per-slice masking:
        one slice at a time, this loop was a third of analyze on densenet121 (785 slices)."""
        slices = list(self.param_slices.values())
        if not slices:
            return
        lengths = np.array([len(ps.ids) for ps in slices], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        g_all, u_all = units.lookup(np.concatenate([np.asarray(ps.ids, dtype=np.int64) for ps in slices]))
        whole = np.zeros(len(slices), dtype=bool)  # one group holds every position
        nonempty = lengths > 0
        if nonempty.any():
            lo = np.minimum.reduceat(g_all, starts[nonempty])
            hi = np.maximum.reduceat(g_all, starts[nonempty])
            whole[nonempty] = (lo == hi) & (lo >= 0)
        for i, ps in enumerate(slices):
            g = g_all[starts[i]:starts[i] + lengths[i]]
            u = u_all[starts[i]:starts[i] + lengths[i]]
            if whole[i]:
                groups[int(g[0])].slices.append(SliceSpec(ps.module_path, ps.param, ps.dim, np.arange(len(g)), u))
                continue
            for gid in np.unique(g[g >= 0]).tolist():
                pos = np.nonzero(g == gid)[0]
                groups[gid].slices.append(SliceSpec(ps.module_path, ps.param, ps.dim, pos, u[pos]))


def _distinct(ids: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``np.unique(ids, return_index=True, return_inverse=True)`` for ids in [0, n), in linear
    time: the sort inside ``np.unique`` was most of the analysis' time on wide networks."""
    present = np.zeros(n, dtype=bool)
    present[ids] = True
    uniq = np.flatnonzero(present)
    inverse = (np.cumsum(present) - 1)[ids]
    first = np.full(len(uniq), len(ids), dtype=np.int64)
    np.minimum.at(first, inverse, np.arange(len(ids), dtype=np.int64))
    return uniq, first, inverse


def bypassed_groups(gm: fx.GraphModule, cg: ChannelGraph) -> set[int]:
    """Prunable groups the network can lose entirely: some input-to-output path avoids every
    producer of the group (a residual block's internal channels), so with all its units gone the
    branch only adds a constant, which finalize folds away. A group that every path crosses (a
    residual stream, a plain chain) must keep a unit, or the output stops depending on the input."""
    nodes = list(gm.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    output = nodes[-1]
    out = set()
    for g in cg.prunable_groups:
        cut = {site.node for site in g.sites}
        seen: set[fx.Node] = set()
        stack = list(inputs)
        while stack:
            n = stack.pop()
            if n in seen or n.name in cut:
                continue
            seen.add(n)
            stack.extend(n.users)
        if output in seen:
            out.add(g.id)
    return out


@gc_paused
def analyze(gm: fx.GraphModule) -> ChannelGraph:
    """Find the channel groups of a traced module (see ``fxprune.trace``).

    Raises ``AnalysisError`` if ``gm`` is not a module returned by ``fxprune.trace``.
    """
    if not isinstance(gm, fx.GraphModule) or not any("fxprune_value" in n.meta for n in gm.graph.nodes):
        raise AnalysisError("fxprune.analyze expects the GraphModule returned by fxprune.trace(model, example_inputs)")
    walk = Walk(gm)
    walk.run()
    return walk.result()


__all__ = ["analyze", "bypassed_groups", "Walk", "maps_in", "arg"]
