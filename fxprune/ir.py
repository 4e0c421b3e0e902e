"""The channel graph: the IR every pruning method shares.

Every channel that a conv/linear produces gets a global *channel id*. A tensor's channel
dimension is described by a ``ChannelMap``: for each position along the dims that carry
channels, the id of the channel it holds (-1: not tracked, e.g. image channels). This is the
per-position form of DESIGN.md's segments ``(group, offset, length)``: concat, split, slicing,
flatten and channel shuffle are plain array operations on it, and ``ChannelMap.segments``
gives the run-length (segment) view back. Coupling ops (add, mul, depthwise conv, ...) unite
ids; each union-find class of ids is one *unit* (one keep/remove decision). A *group* is a
connected component of producer spaces linked through shared units (networkx); its size is its
number of units, and a gate holds one value per unit.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import networkx as nx
import numpy as np
import torch.fx as fx

from fxprune.errors import AnalysisError, ConfigError


@dataclass
class ChannelMap:
    """Channel ids held by a tensor along ``dims`` (usually one dim: the channel dim)."""

    dims: tuple[int, ...]
    ids: np.ndarray  # int64, shape == extents along dims

    def segments(self, units: "UnitTable") -> list[tuple[int, int, int]]:
        """Run-length view ``[(group, first unit index, length), ...]`` of a 1-D map."""
        out: list[tuple[int, int, int]] = []
        for cid in self.ids.ravel():
            g, u = units.locate(int(cid))
            if out and out[-1][0] == g and g >= 0 and out[-1][1] + out[-1][2] == u:
                out[-1] = (g, out[-1][1], out[-1][2] + 1)
            elif out and out[-1][0] == g == -1:
                out[-1] = (-1, -1, out[-1][2] + 1)
            else:
                out.append((g, u, 1))
        return out


@dataclass
class SizeOf:
    """An integer (or a tuple of them, ``parts``) computed from tensor sizes, with the channel ids
    whose count it depends on: empty ``ids`` means it reads no tracked channel extent."""

    ids: np.ndarray
    parts: tuple["SizeOf", ...] | None = None

    @staticmethod
    def of(parts: list["SizeOf"]) -> "SizeOf":
        ids = np.unique(np.concatenate([p.ids for p in parts])) if parts else np.zeros(0, np.int64)
        return SizeOf(ids.astype(np.int64), tuple(parts))

    def index(self, key: object) -> "SizeOf":
        """``self[key]`` for an int or slice key; an unknown key depends on every part."""
        if self.parts is None:
            return self
        if isinstance(key, int) and -len(self.parts) <= key < len(self.parts):
            return self.parts[key]
        if isinstance(key, slice):
            return SizeOf.of(list(self.parts[key]))
        return SizeOf(self.ids)


@dataclass
class ParamSlice:
    """Positions of ``module_path.param`` along ``dim`` and the channel id each holds."""

    module_path: str
    param: str
    dim: int
    ids: np.ndarray

    @property
    def qualname(self) -> str:
        return f"{self.module_path}.{self.param}" if self.module_path else self.param


@dataclass
class Layer:
    """A conv or linear node, with what the cost model and finalize need to know about it."""

    node: str
    kind: str  # "conv", "conv_transpose" or "linear"
    module_path: str | None  # None for functional calls with get_attr weights
    weight: str  # qualified parameter name
    bias: str | None
    in_ids: np.ndarray  # channel id per input channel (-1 untracked)
    out_ids: np.ndarray
    groups: int
    in_per_group: int
    macs_per_pair: int  # output elements per output channel x kernel elements (per batch item)
    zero_padding: bool  # padding is 0 everywhere: constant inputs fold exactly into the bias


@dataclass
class Site:
    """A place where a group's channels are produced: a gate goes on ``node``'s output."""

    node: str
    dim: int
    units: np.ndarray  # unit index (within the group) of each position along ``dim``


@dataclass
class SliceSpec:
    """One parameter (or buffer) slice a group owns: keep/remove positions along ``dim``."""

    module_path: str
    param: str
    dim: int
    positions: np.ndarray
    units: np.ndarray  # the group's unit index held at each of ``positions``

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """Contiguous ``[start, stop)`` index ranges covered by this slice."""
        out: list[tuple[int, int]] = []
        for p in self.positions.tolist():
            if out and out[-1][1] == p:
                out[-1] = (out[-1][0], p + 1)
            else:
                out.append((p, p + 1))
        return out


@dataclass
class ChannelGroup:
    """Channels that must be kept or removed together, one decision per unit."""

    id: int
    size: int
    prunable: bool
    reason: str | None
    sites: list[Site] = field(default_factory=list)
    slices: list[SliceSpec] = field(default_factory=list)
    spaces: list[str] = field(default_factory=list)  # producer nodes whose channels are here

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "size": self.size,
            "prunable": self.prunable,
            "reason": self.reason,
            "producers": self.spaces,
            "slices": [
                {"module": s.module_path, "param": s.param, "dim": s.dim, "ranges": s.ranges}
                for s in self.slices
            ],
        }


class UnitTable:
    """Maps a global channel id to (group id, unit index within the group)."""

    def __init__(self, group_of: np.ndarray, unit_of: np.ndarray):
        self.group_of = group_of
        self.unit_of = unit_of

    def locate(self, cid: int) -> tuple[int, int]:
        if cid < 0:
            return -1, -1
        return int(self.group_of[cid]), int(self.unit_of[cid])

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised locate: (group ids, unit indices), -1 where ``ids`` is -1."""
        ids = np.asarray(ids)
        tracked = ids >= 0
        if tracked.all():  # the common case, without the masking
            return self.group_of[ids], self.unit_of[ids]
        safe = np.where(tracked, ids, 0)
        return np.where(tracked, self.group_of[safe], -1), np.where(tracked, self.unit_of[safe], -1)


def node_signature(node: fx.Node, batch: bool = True) -> str:
    """``op:target:shape`` of a traced node (the shape of its tensor value, where it has one;
    without its first, batch, dimension when ``batch`` is False)."""
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", repr(node.target))
    shape = getattr(node.meta.get("fxprune_value"), "shape", None)
    shape = "" if shape is None else tuple(shape) if batch else tuple(shape)[1:]
    return f"{node.op}:{target}:{shape}"


@dataclass
class ChannelGraph:
    """The result of ``fxprune.analyze``: groups, the slices they own, and per-node maps."""

    groups: list[ChannelGroup]
    units: UnitTable
    layers: list[Layer]
    param_slices: dict[tuple[str, int], ParamSlice]
    node_maps: dict[str, Any]  # node name -> ChannelMap / None / nested tuples of them
    coupling: nx.Graph  # producer-space nodes; edges join spaces sharing a unit
    blocked: dict[int, str]  # group id -> reason
    # node name -> the SizeOf of an integer (tuple) node that reads a tracked channel extent
    channel_sizes: dict[str, SizeOf] = field(default_factory=dict)
    size_uses: set[str] = field(default_factory=set)  # nodes (not size arithmetic) that consume one
    # node name -> "op:target" of the traced graph analysed: a graph from another module is refused
    source: dict[str, str] = field(default_factory=dict)

    def fingerprint(self, gm: fx.GraphModule) -> str:
        """A digest of the analysed graph as found in ``gm`` (its own or a gated copy): node names,
        ops, targets and value shapes without the batch dimension. Equal for the same architecture
        traced at the same input size; what ``fxprune.load`` checks before replaying a record."""
        lines = [f"{n.name}={node_signature(n, batch=False)}" for n in gm.graph.nodes if n.name in self.source]
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]

    def check_source(self, gm: fx.GraphModule, where: str) -> None:
        """Raise ``AnalysisError`` unless ``gm`` holds the nodes this graph was computed from (a
        gated copy does: gates only add nodes). Names alone can agree by chance across modules
        (``fx`` names nodes after their modules), so op and target are compared too."""
        nodes = {n.name: n for n in gm.graph.nodes}
        wrong = [name for name, sig in self.source.items() if name not in nodes or node_signature(nodes[name]) != sig]
        if wrong:
            raise AnalysisError(f"{where}: the channel graph was computed from another module (its nodes {wrong[:3]} "
                                "are not in this module, or are other ops); pass the channel graph that fxprune.analyze "
                                "returned for it")

    @property
    def prunable_groups(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def group(self, gid: int) -> ChannelGroup:
        return self.groups[gid]

    def keep_masks(self, keep: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """Complete a partial ``{group: bool[size]}`` decision: unlisted groups keep everything.
        Raises ``ConfigError`` for a mask of the wrong size."""
        out = {}
        for g in self.groups:
            mask = np.ones(g.size, dtype=bool) if g.id not in keep else np.asarray(keep[g.id], bool)
            if mask.shape != (g.size,):
                raise ConfigError(f"keep mask of group {g.id} has shape {mask.shape}, expected ({g.size},): one "
                                  "entry per unit of the group (ChannelGroup.size)")
            out[g.id] = mask
        return out

    def kept_positions(self, ids: np.ndarray, keep: dict[int, np.ndarray]) -> np.ndarray:
        """Boolean mask over ``ids``: True where the channel survives (untracked always does);
        groups missing from ``keep`` keep everything. For many queries under one decision, build
        ``survivors`` once."""
        return self.survivors(self.keep_masks(keep))(ids)

    def survivors(self, keep: dict[int, np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
        """``kept_positions`` under one fixed, complete decision: the survival of every channel
        id is tabulated once, so each call is a single lookup (finalize makes hundreds)."""
        sizes = np.array([g.size for g in self.groups], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        flat = np.concatenate([np.asarray(keep[g.id], dtype=bool) for g in self.groups] + [np.ones(1, bool)])
        group_of, unit_of = self.units.group_of, self.units.unit_of
        index = np.where(group_of >= 0, offsets[np.clip(group_of, 0, None)] + unit_of, len(flat) - 1)
        alive = np.append(flat[index], True)  # id -1 (untracked) reads the last entry: kept
        return lambda ids: alive[np.asarray(ids, dtype=np.int64)]

    def summary(self) -> dict[str, Any]:
        total = sum(g.size for g in self.groups)
        prunable = sum(g.size for g in self.groups if g.prunable)
        return {
            "groups": len(self.groups),
            "prunable_groups": len(self.prunable_groups),
            "channels": total,
            "prunable_channels": prunable,
            "prunable_fraction": prunable / total if total else 0.0,
        }

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), "groups": [g.to_dict() for g in self.groups]}

    def __iter__(self) -> Iterator[ChannelGroup]:
        return iter(self.groups)
