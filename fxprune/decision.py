"""Decision: what a pruning method decides, and all that finalize needs from it.

Per channel group a keep mask over its units; optionally per group a scale per unit that is
folded into the group's producers (a gate's surviving values); optionally per group a merge of
removed units into kept ones (``Merge``: what a removed unit fed its consumers is added, scaled,
to its representative's input columns, so a redundant filter leaves without its contribution);
optionally per parameter a weight mask of exact zeros (unstructured sparsity). Gates are one way
to reach a Decision (``fxprune.passes.read_gates``); one-shot and regularization methods build it
directly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from fxprune.errors import ConfigError
from fxprune.ir import ChannelGraph


@dataclass(frozen=True)
class Merge:
    """Per unit of a group: the kept unit it is merged into (-1: none) and the factor its
    consumer columns are added with (``W[:, into[u]] += scale[u] * W[:, u]``)."""

    into: np.ndarray
    scale: np.ndarray


@dataclass
class Decision:
    keep: dict[int, np.ndarray]
    scale: dict[int, torch.Tensor] = field(default_factory=dict)
    weight_masks: dict[str, torch.Tensor] = field(default_factory=dict)
    merge: dict[int, Merge] = field(default_factory=dict)

    @staticmethod
    def top_k(scores: dict[int, np.ndarray], widths: dict[int, int]) -> "Decision":
        """Keep the ``widths[g]`` highest-scored units of every listed group: another method's
        criterion at the same per-group widths (``Decision.kept()`` of the first)."""
        keep = {}
        for gid, k in widths.items():
            s = np.asarray(scores[gid])
            if not 1 <= k <= len(s):
                raise ConfigError(f"Decision.top_k: group {gid} has {len(s)} units, asked to keep {k}; widths must "
                                  "be in 1..group size")
            mask = np.zeros(len(s), dtype=bool)
            mask[np.argsort(-s, kind="stable")[:k]] = True
            keep[gid] = mask
        return Decision(keep)

    def complete(self, cg: ChannelGraph) -> "Decision":
        """A copy with a mask for every group (unlisted groups keep all), checked against ``cg``.

        Raises ``ConfigError`` for a mask or scale of the wrong size, an unknown group, or units
        removed from a group that is not prunable."""
        unknown = sorted(set(self.keep) - {g.id for g in cg.groups})
        if unknown:
            raise ConfigError(f"Decision names groups {unknown} that this channel graph does not have (its groups: "
                              f"0..{len(cg.groups) - 1}); build the Decision from the graph you finalize with "
                              "(graph.prunable_groups)")
        keep = cg.keep_masks({gid: np.asarray(m, dtype=bool) for gid, m in self.keep.items()})
        for g in cg.groups:
            if not g.prunable and not keep[g.id].all():
                raise ConfigError(f"Decision removes units of group {g.id}, which is not prunable ({g.reason}); "
                                  "keep every unit of it, or decide only over graph.prunable_groups")
        for gid, s in self.scale.items():
            if gid not in keep or tuple(s.shape) != (cg.group(gid).size,):
                raise ConfigError(f"Decision scale of group {gid} has shape {tuple(s.shape)}; "
                                  f"expected ({cg.group(gid).size},) for a group of the channel graph")
        for gid, m in self.merge.items():
            into = np.asarray(m.into)
            ok = gid in keep and into.shape == np.shape(m.scale) == keep[gid].shape
            merged = into >= 0
            if not ok or (into >= len(into)).any() or keep[gid][merged].any() or not keep[gid][into[merged]].all():
                raise ConfigError(f"Decision merge of group {gid} must map each removed unit to a kept unit of the "
                                  "same group (-1 for none), with one scale per unit; build it from the keep mask")
        return Decision(keep, dict(self.scale), dict(self.weight_masks), dict(self.merge))

    def gate_values(self, gid: int, size: int) -> torch.Tensor:
        """What a gate of group ``gid`` holds under this decision: scale (or 1) where kept, else 0."""
        keep = torch.as_tensor(self.keep.get(gid, np.ones(size, dtype=bool)))
        scale = self.scale.get(gid)
        values = torch.ones(size) if scale is None else scale.detach().float().clone()
        return torch.where(keep, values, torch.zeros(()))

    def kept(self) -> dict[int, int]:
        return {gid: int(m.sum()) for gid, m in self.keep.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"kept": self.kept(), "scaled_groups": sorted(self.scale), "weight_masks": sorted(self.weight_masks),
                "merged": {gid: int((np.asarray(m.into) >= 0).sum()) for gid, m in self.merge.items()}}


def merge_consumers(module: nn.Module, cg: ChannelGraph, decision: Decision) -> int:
    """Carry out ``decision.merge`` on ``module`` (a working copy: its weight tensors are replaced,
    never written): each conv/linear that reads a merged unit adds that unit's input columns,
    times its scale, to the columns of the unit it is merged into (position by position where a
    unit spans several features, after a flatten). Grouped convs and transposed convs read their
    inputs per group and are left alone. Returns the number of weight tensors changed.

    Finalize applies this to its reference copy before anything else, so the pruned module is
    checked against the gated module with the merge: the removed columns are then dropped exactly."""
    changed, seen = 0, set()
    for layer in cg.layers:
        if layer.module_path is None or layer.kind == "conv_transpose" or layer.groups != 1 or layer.weight in seen:
            continue
        seen.add(layer.weight)
        gids, uids = cg.units.lookup(layer.in_ids)
        moves = []  # (target positions, source positions, scale)
        for gid, m in decision.merge.items():
            for u in np.nonzero(np.asarray(m.into) >= 0)[0]:
                src = np.nonzero((gids == gid) & (uids == u))[0]
                dst = np.nonzero((gids == gid) & (uids == m.into[u]))[0]
                if len(src) and len(src) == len(dst):
                    moves.append((dst, src, float(m.scale[u])))
        if not moves:
            continue
        mod = module.get_submodule(layer.module_path)
        w = mod.weight.detach().clone()
        for dst, src, s in moves:
            w[:, dst] += s * w[:, src]
        mod.weight = nn.Parameter(w, requires_grad=mod.weight.requires_grad)
        changed += 1
    return changed
