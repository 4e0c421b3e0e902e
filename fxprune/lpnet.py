"""LPNet: a learned latency predictor over the widths of a model's prunable groups (METHODS.md §2).

The encoding of a sub-network is the kept fraction of every prunable channel group,
``e = (n_1/C_1, ..., n_G/C_G)``; the predictor maps it to latency relative to the dense model,
measured on one backend (``fxprune.flow.latency_model`` samples, builds, measures and fits).

The network is ``r(e) = a . e + b + MLP(e)``: the linear part carries the near-additive bulk
of latency (each group's layers cost roughly in proportion to its width), the MLP the
interactions (a layer's cost is bilinear in its input and output widths) and the staircases of
blocked kernels. It is trained on relative error, since a 5% error matters as much on a small
sub-network as on the dense one. Because ``e`` is a sum of keep values, the predictor is
differentiable in soft widths (gates, indicators): ``LatencyPredictor.resource`` plugs into
``CostModel.resources`` as the ``"latency"`` resource (microseconds) for budgets, the allocator
and gate penalties alike. The linear-plus-MLP form and the relative loss are this library's
choices [A]; the paper's architecture is not reachable (METHODS.md §2).

Fitted to two groups whose latency is bilinear in their widths, it predicts a held-out width:

    >>> import numpy as np
    >>> e = np.random.default_rng(0).uniform(0.2, 1.0, (40, 2))
    >>> r = 0.2 + 0.8 * e[:, 0] * e[:, 1]             # latency relative to dense
    >>> p = LatencyPredictor(groups=[0, 1], sizes=[32, 64], dense_ms=4.0)
    >>> p.fit(e, r, steps=500) < 2.0                   # training error, percent
    True
    >>> keep = {0: np.arange(32) < 16, 1: np.arange(64) < 32}   # half of each group
    >>> abs(p.predict_ms(keep) - 4.0 * (0.2 + 0.8 * 0.25)) < 0.1
    True
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from fxprune.errors import ConfigError


class _Net(nn.Module):
    def __init__(self, n: int, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n, 1)
        self.mlp = nn.Sequential(nn.Linear(n, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return (self.linear(e) + self.mlp(e)).squeeze(-1)


@dataclass
class LatencyPredictor:
    """Predicted latency of a sub-network from its width encoding; ``dense_ms`` is measured.

    ``groups``/``sizes``: the prunable groups (ids and unit counts) the encoding follows, in order.
    ``meta``: what it was measured on (backend, machine, settings), for reports and the cache.
    """

    groups: list[int]
    sizes: list[int]
    dense_ms: float
    hidden: int = 64
    meta: dict[str, Any] = field(default_factory=dict)
    net: _Net = field(init=False)

    def __post_init__(self) -> None:
        self.net = _Net(len(self.groups), self.hidden).double()

    def encode(self, keep: dict) -> torch.Tensor:
        """The encoding of a keep decision (bool masks or soft tensors; missing groups are dense)."""
        parts = []
        for gid, size in zip(self.groups, self.sizes):
            k = keep.get(gid)
            if k is None:
                parts.append(torch.ones((), dtype=torch.float64))
            elif isinstance(k, torch.Tensor):
                parts.append(k.to(torch.float64).sum() / size)
            else:
                parts.append(torch.tensor(float(np.asarray(k).sum()) / size, dtype=torch.float64))
        return torch.stack(parts)

    def ratio(self, e: torch.Tensor) -> torch.Tensor:
        """Predicted latency relative to the dense model for encodings ``e`` ([..., G])."""
        return self.net(e.to(torch.float64))

    def predict_ms(self, keep: dict) -> float:
        with torch.no_grad():
            return float(self.ratio(self.encode(keep))) * self.dense_ms

    def resource(self, keep: dict | None = None) -> float | torch.Tensor:
        """Predicted latency in microseconds (a tensor with gradients for soft keep values)."""
        keep = keep or {}
        soft = any(isinstance(v, torch.Tensor) and v.requires_grad for v in keep.values())
        with torch.set_grad_enabled(soft):
            us = self.ratio(self.encode(keep)) * (self.dense_ms * 1000.0)
        return us if soft else float(us)

    def fit(self, encodings: np.ndarray, ratios: np.ndarray, steps: int = 3000, lr: float = 3e-3,
            weight_decay: float = 1e-5, seed: int = 0) -> float:
        """Fit to measured (encoding, latency / dense latency) pairs; returns the final training
        mean absolute percentage error. The linear part starts at the least-squares solution."""
        x = torch.as_tensor(np.asarray(encodings), dtype=torch.float64)
        y = torch.as_tensor(np.asarray(ratios), dtype=torch.float64)
        if x.ndim != 2 or x.shape[1] != len(self.groups) or len(y) != len(x) or len(x) < 2:
            raise ConfigError(f"LatencyPredictor.fit needs [N, {len(self.groups)}] encodings and N ratios (N >= 2), "
                              f"got {tuple(x.shape)} and {tuple(y.shape)}")
        torch.manual_seed(seed)
        self.net = _Net(len(self.groups), self.hidden).double()
        with torch.no_grad():  # least squares on relative error for the linear part
            a = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) / y[:, None]
            sol = torch.linalg.lstsq(a, torch.ones(len(x), 1, dtype=x.dtype), rcond=None).solution
            self.net.linear.weight.copy_(sol[:-1].T)
            self.net.linear.bias.copy_(sol[-1])
            self.net.mlp[-1].weight.zero_()
            self.net.mlp[-1].bias.zero_()
        opt = torch.optim.Adam(self.net.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        for _ in range(steps):
            opt.zero_grad()
            loss = (((self.ratio(x) - y) / y) ** 2).mean()
            loss.backward()
            opt.step()
            sched.step()
        return self.mape(x, y)

    def mape(self, encodings: np.ndarray | torch.Tensor, ratios: np.ndarray | torch.Tensor) -> float:
        """Mean absolute percentage error on (encoding, ratio) pairs, in percent."""
        x = torch.as_tensor(np.asarray(encodings), dtype=torch.float64)
        y = torch.as_tensor(np.asarray(ratios), dtype=torch.float64)
        with torch.no_grad():
            return float(((self.ratio(x) - y).abs() / y).mean() * 100)

    def state_dict(self) -> dict[str, Any]:
        return {"groups": list(self.groups), "sizes": list(self.sizes), "dense_ms": self.dense_ms,
                "hidden": self.hidden, "meta": dict(self.meta), "net": self.net.state_dict()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "LatencyPredictor":
        p = cls(list(state["groups"]), list(state["sizes"]), float(state["dense_ms"]), int(state["hidden"]),
                dict(state["meta"]))
        p.net.load_state_dict(state["net"])
        return p


def encode_counts(groups: Sequence[int], sizes: Sequence[int], counts: dict[int, int]) -> np.ndarray:
    """The encoding of per-group kept counts (the samples' form)."""
    return np.array([counts.get(g, s) / s for g, s in zip(groups, sizes)], dtype=np.float64)
