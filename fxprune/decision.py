"""Decision: what a pruning method decides, and all that finalize needs from it.

Per channel group a keep mask over its units; optionally per group a scale per unit that is
folded into the group's producers (a gate's surviving values); optionally per parameter a weight
mask of exact zeros (unstructured sparsity). Gates are one way to reach a Decision
(``fxprune.passes.read_gates``); one-shot and regularization methods build it directly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fxprune.errors import ConfigError
from fxprune.ir import ChannelGraph


@dataclass
class Decision:
    keep: dict[int, np.ndarray]
    scale: dict[int, torch.Tensor] = field(default_factory=dict)
    weight_masks: dict[str, torch.Tensor] = field(default_factory=dict)

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
        return Decision(keep, dict(self.scale), dict(self.weight_masks))

    def gate_values(self, gid: int, size: int) -> torch.Tensor:
        """What a gate of group ``gid`` holds under this decision: scale (or 1) where kept, else 0."""
        keep = torch.as_tensor(self.keep.get(gid, np.ones(size, dtype=bool)))
        scale = self.scale.get(gid)
        values = torch.ones(size) if scale is None else scale.detach().float().clone()
        return torch.where(keep, values, torch.zeros(()))

    def kept(self) -> dict[int, int]:
        return {gid: int(m.sum()) for gid, m in self.keep.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"kept": self.kept(), "scaled_groups": sorted(self.scale), "weight_masks": sorted(self.weight_masks)}
