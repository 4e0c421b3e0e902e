"""Functionality-oriented filter pruning (Qin et al., "Functionality-Oriented Convolutional Filter
Pruning", ../shared/METHODS.md §3): remove filters whose *function* another filter already
provides, without retraining.

The paper's mechanism: describe each filter by what it responds to, cluster the filters of a
layer by that description, keep one representative per cluster and prune the rest — magnitude
says nothing about whether two filters do the same job. Here, per channel group (a residual
stream's unit is described at every producer that writes it, the descriptions concatenated):

1. **Functionality** of every unit (``representation``):
   - ``"class"``: its response profile, the mean activation (after the producer's norm, averaged
     over positions) per class of the calibration data;
   - ``"sample"``: its activation on each calibration example (a vector of N examples; works
     without labels);
   - ``"ascent"``: its feature-interest pattern by activation maximisation — the input that
     maximises the unit's mean activation, found by ``ascent_steps`` of gradient ascent from a
     fixed random start with an L2 penalty ``ascent_l2`` on the input, batched over all units
     of a group (one input per unit); needs no data.
   Each description is centred and scaled to unit norm, so distance is 1 - correlation: what a
   filter responds to, not how strongly. A unit whose description is constant (a dead filter)
   does nothing another cannot do and is the first to go.
2. **Clustering**: average-linkage agglomerative clustering of the group's units on that
   distance. Cutting the tree at k clusters and keeping one unit per cluster removes, one by one,
   the units whose function is closest to one that stays; the height of each merge is what
   removing one more unit of the group costs in functionality.
3. **How many per group** (the paper sets the number of clusters per layer by hand; this is the
   library's choice): the merge heights of all groups are ranked together by the shared
   allocator (``fxprune.budget.allocate``), which removes the cheapest merges first until the
   FLOPs/params budget holds exactly. Distances are correlations in [0, 2] in every group, so they
   rank across groups without normalisation.
4. **Which unit stays** in a cluster: the one whose response varies most (``keep="active"``; the
   strongest carrier of the shared function), or the medoid (``keep="medoid"``).

Defaults were chosen on a validation split of digits-hard (a fifth of the training images; ResNet-20
trained 12 epochs, seed 0, pruned with compensation): ``"sample"`` and ``"class"`` tied (92.4 / 91.0
/ 89.6% against 91.0 / 91.3 / 90.3% at 70 / 50 / 30% FLOPs, one validation image is 0.28 points),
and ``"sample"`` needs no labels. Without compensation every representation, like ``l1``, left
the network at chance there: removing channels shifts what every later BatchNorm normalises.

No training: ``compile(model, "functionality", budget, x, calib_loader=...)`` with ``epochs=0``.
``compensate=True`` then refits the consumers so that what a removed filter fed is carried by
its representative (``fxprune.passes.compensate``). ``report()`` gives the calibration cost:
forward passes, backward passes, examples seen, ascent steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.cluster.hierarchy import cut_tree, linkage
from scipy.spatial.distance import squareform
from tqdm.auto import tqdm

from fxprune import checks
from fxprune.budget import allocate
from fxprune.decision import Decision
from fxprune.errors import ConfigError
from fxprune.ir import ChannelGroup
from fxprune.method import Context, Method, register_method
from fxprune.scores import anchor_sites, filter_matrix

REPRESENTATIONS = ("class", "sample", "ascent")


@dataclass(frozen=True)
class FunctionalityOptions:
    representation: str = "sample"
    batches: int = 8  # calibration batches read for "class" / "sample"
    ascent_steps: int = 50
    ascent_lr: float = 0.1
    ascent_l2: float = 1e-2
    keep: str = "active"


@register_method
class Functionality(Method):
    """Cluster each group's units by what they respond to; keep one per cluster (no training)."""

    name = "functionality"
    Options = FunctionalityOptions
    needs_data = True

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        if o.representation not in REPRESENTATIONS:
            raise ConfigError(f"functionality representation must be one of {REPRESENTATIONS}, got {o.representation!r}")
        if o.keep not in ("active", "medoid"):
            raise ConfigError(f"functionality keep must be 'active' or 'medoid', got {o.keep!r}")
        if o.batches < 1 or o.ascent_steps < 1:
            raise ConfigError("functionality batches and ascent_steps must be >= 1")
        self.cost: dict[str, int] = {"forward_passes": 0, "backward_passes": 0, "examples": 0, "ascent_steps": 0}

    def decide(self, ctx: Context, data: Any = None) -> Decision:
        groups = ctx.graph.prunable_groups
        if self.options.representation == "ascent":
            described = self._ascent(ctx, groups)
        else:
            if data is None:
                raise ConfigError(f"functionality with representation={self.options.representation!r} reads "
                                  "calibration data: pass calib_loader=... (or train_loader) to compile, or "
                                  "data=... to finalize; representation='ascent' needs none")
            described = self._responses(ctx, groups, data)
        distances = {gid: _distances(vectors) for gid, (vectors, _) in described.items()}
        trees = {gid: _tree(d) for gid, d in distances.items()}
        # one score per unit: the n - 1 merge heights (removing one more unit costs the next merge), and
        # the last unit of a group, which is never merged away
        heights = {gid: np.append(np.sort(z[:, 2]), np.inf) for gid, z in trees.items()}
        counts = allocate(ctx.cost, ctx.targets, heights)
        keep = {}
        for g in groups:
            keep[g.id] = _representatives(trees[g.id], distances[g.id], described[g.id][1], int(counts[g.id].sum()),
                                          self.options.keep)
        return Decision(keep)

    def report(self, ctx: Context) -> dict[str, Any]:
        return {"representation": self.options.representation, "calibration": dict(self.cost)}

    # ---- descriptions ------------------------------------------------------------------------------
    def _responses(self, ctx: Context, groups: list[ChannelGroup], data: Any) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Per group: (units x features) descriptions and each unit's response spread."""
        gm = ctx.module
        sites = anchor_sites(gm, ctx.graph, groups)
        modules = dict(gm.named_modules())
        per_site: dict[int, list[torch.Tensor]] = {k: [] for k in range(len(sites))}
        labels: list[torch.Tensor] = []

        def hook(k: int, dim: int):
            def record(_mod, _inp, out):
                per_site[k].append(out.detach().movedim(dim, 1).flatten(2).mean(2).double())  # examples x channels
            return record

        handles = [modules[target].register_forward_hook(hook(k, site.dim)) for k, (_, site, target) in enumerate(sites)]
        was_training = gm.training
        gm.eval()
        try:
            with torch.no_grad():
                read = checks.batches(data, self.options.batches, "functionality's calibration data")
                for x, y in tqdm(read, total=min(self.options.batches, len(data)), desc="functionality: calibration",
                                 disable=not ctx.show_progress, leave=False):
                    gm(x)
                    labels.append(y)
                    self.cost["forward_passes"] += 1
                    self.cost["examples"] += int(x.shape[0])
        finally:
            for h in handles:
                h.remove()
            gm.train(was_training)
        y = torch.cat(labels)
        out: dict[int, list[np.ndarray]] = {g.id: [] for g in groups}
        spread: dict[int, np.ndarray] = {g.id: np.zeros(g.size) for g in groups}
        sizes = {g.id: g.size for g in groups}
        for k, (gid, site, _) in enumerate(sites):
            acts = torch.cat(per_site[k]).numpy()  # examples x channels at this site
            units = _per_unit(acts.T, site.units, sizes[gid])  # units x examples
            spread[gid] += units.std(1)
            if self.options.representation == "class":
                classes = torch.unique(y)
                units = np.stack([units[:, (y == c).numpy()].mean(1) for c in classes], 1)
            out[gid].append(units)
        described = {gid: (np.concatenate(v, 1), spread[gid]) for gid, v in out.items() if v}
        for g in groups:  # no producer output a hook can read (a functional conv): its filters describe it
            if g.id not in described:
                filters = filter_matrix(gm, ctx.graph, g)
                described[g.id] = (filters, np.linalg.norm(filters, axis=1))
        return described

    def _ascent(self, ctx: Context, groups: list[ChannelGroup]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Per group: the input each unit's mean activation is highest on (activation maximisation)."""
        gm = ctx.module
        modules = dict(gm.named_modules())
        example = next(t for t in ctx.example_inputs if isinstance(t, torch.Tensor))
        was_training = gm.training
        gm.eval()
        requires = [p.requires_grad for p in gm.parameters()]
        for p in gm.parameters():
            p.requires_grad_(False)
        out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        try:
            for g in tqdm(groups, desc="functionality: activation maximisation", disable=not ctx.show_progress,
                          leave=False):
                sites = anchor_sites(gm, ctx.graph, [g])
                if not sites:  # nothing a hook can read: its filters describe it
                    filters = filter_matrix(gm, ctx.graph, g)
                    out[g.id] = (filters, np.linalg.norm(filters, axis=1))
                    continue
                start = torch.Generator().manual_seed(g.id)
                x = (0.1 * torch.randn((g.size, *example.shape[1:]), generator=start)).requires_grad_(True)
                opt = torch.optim.Adam([x], lr=self.options.ascent_lr)
                acts: dict[int, torch.Tensor] = {}
                handles = [modules[target].register_forward_hook(
                    lambda _m, _i, o, k=k, d=site.dim: acts.__setitem__(k, o.movedim(d, 1).flatten(2).mean(2)))
                    for k, (_, site, target) in enumerate(sites)]
                try:
                    for _ in range(self.options.ascent_steps):
                        opt.zero_grad(set_to_none=True)
                        gm(x)
                        # input i maximises unit i's mean activation at every site that writes it
                        goal = sum(_unit_diagonal(acts[k], site.units, g.size) for k, (_, site, _t) in enumerate(sites))
                        loss = -goal.sum() + self.options.ascent_l2 * x.pow(2).sum()
                        loss.backward()
                        opt.step()
                        self.cost["forward_passes"] += 1
                        self.cost["backward_passes"] += 1
                        self.cost["ascent_steps"] += 1
                finally:
                    for h in handles:
                        h.remove()
                with torch.no_grad():
                    gm(x)
                    strength = sum(_unit_diagonal(acts[k], site.units, g.size) for k, (_, site, _t) in enumerate(sites))
                out[g.id] = (x.detach().flatten(1).double().numpy(), strength.detach().double().numpy())
        finally:
            for p, r in zip(gm.parameters(), requires):
                p.requires_grad_(r)
            gm.train(was_training)
        return out


def _per_unit(rows: np.ndarray, units: np.ndarray, size: int) -> np.ndarray:
    """Channel rows summed into their units (a unit may hold several channels of a grouped conv)."""
    out = np.zeros((size, rows.shape[1]))
    np.add.at(out, units, rows)
    return out


def _unit_diagonal(act: torch.Tensor, units: np.ndarray, size: int) -> torch.Tensor:
    """For input i, the mean activation of unit i (summed over its channels at this site)."""
    per_unit = torch.zeros(act.shape[0], size, dtype=act.dtype).index_add(1, torch.as_tensor(units), act)
    return per_unit.diagonal()


def _distances(vectors: np.ndarray) -> np.ndarray:
    """1 - correlation between units' descriptions; a constant (dead) unit is at 0 from every unit."""
    centred = vectors - vectors.mean(1, keepdims=True)
    norm = np.linalg.norm(centred, axis=1)
    live = norm > 1e-12 * max(1.0, float(norm.max(initial=0.0)))
    unit = np.where(live[:, None], centred / np.where(live, norm, 1.0)[:, None], 0.0)
    d = np.clip(1.0 - unit @ unit.T, 0.0, 2.0)
    d[~live, :] = 0.0
    d[:, ~live] = 0.0
    np.fill_diagonal(d, 0.0)
    return d


def _tree(d: np.ndarray) -> np.ndarray:
    """Average-linkage merges of the units on distances ``d`` (scipy's linkage matrix; empty for one unit)."""
    if len(d) < 2:
        return np.zeros((0, 4))
    return linkage(squareform(d, checks=False), method="average")


def _representatives(tree: np.ndarray, d: np.ndarray, activity: np.ndarray, k: int, rule: str) -> np.ndarray:
    """Keep mask with one unit per cluster when the tree is cut into ``k`` clusters."""
    n = len(d)
    keep = np.zeros(n, dtype=bool)
    if k >= n:
        keep[:] = True
        return keep
    labels = cut_tree(tree, n_clusters=k).ravel() if len(tree) else np.zeros(n, dtype=int)
    for c in np.unique(labels):
        members = np.nonzero(labels == c)[0]
        if rule == "medoid":
            best = members[np.argmin(d[np.ix_(members, members)].sum(1))]
        else:
            best = members[np.argmax(activity[members])]
        keep[best] = True
    return keep
