"""Functionality-oriented filter pruning (Qin, Yu, Liu, Chen, arXiv 1810.07322, "Functionality-Oriented
Convolutional Filter Pruning", v1 "Interpretable Convolutional Filter Pruning"; ../shared/METHODS.md §3):
remove filters whose *function* another filter of the layer already provides, without retraining.

Sources: only the abstracts of the paper and of its companion ("Demystifying Neural Network Filter
Pruning") could be read, and the authors published no code; the settings below marked [S] are those
of the public re-implementation ihanwen99/Model-Pruning-in-Deep-Learning (VGG-19, CIFAR-10).

- [V, abstracts] A filter is judged by a qualitative interpretation of what it detects, not by its
  magnitude; filters with repetitive functionality are redundant; pruning them needs no retraining.
- **Functionality** (``representation="ascent"``, the default): each unit's *feature-interest
  pattern* by activation maximisation. [S] Start from a constant image, take ``ascent_steps`` plain
  SGD steps (lr ``ascent_lr``) on the input maximising the sum of the unit's feature map, and blur
  the image with a 3x3 Gaussian of sigma ``blur_sigma`` after every step (500, 0.1, 0.5 there).
  [A] The feature map is read after the producer's norm (where a gate would sit); the units of a
  group are maximised together, one image each, the forward stopped at the last layer that writes
  the group; a residual unit is maximised at every producer that writes it.
  [A] Data-driven alternatives for comparison: ``"sample"`` (the unit's response, averaged over
  positions, on each calibration example) and ``"class"`` (its mean response per class; the
  companion paper's class preference of a filter [S]).
- **Similarity and clustering** [A; the re-implementation runs k-means on the pattern pixels, a
  fixed k per layer]: distance 1 - correlation of the centred patterns (what a filter responds to,
  not how strongly), scipy's hierarchical ``linkage`` (``"average"``). A tree is needed so that the
  budget can be met: cutting it at k clusters removes the units closest in function first, and its
  merge heights (correlation distances, comparable across layers) are what ``fxprune.budget.allocate``
  ranks across groups to meet the FLOPs/params budget exactly. The paper sets k per layer by hand;
  ``widths={group id: kept units}`` sets it directly (e.g. another method's ``Decision.kept()``).
- **Representative** [R: "the strongest filter of a cluster"]: the unit whose maximised activation
  (or response spread) is largest (``keep="active"``), or the cluster's medoid.
- **Merge** (``merge=True``) [A; what "redundant, so no retraining" needs]: a removed unit's consumer
  input columns are added to its representative's, times the least-squares factor
  s = <a_u, a_r> / <a_r, a_r> of the two consumer inputs on the calibration data (1 without data),
  so the pruned layer still receives what the removed filter fed it (``Decision.merge``; finalize
  checks the pruned model against the gated one with the merge). ``compensate=True`` refits the
  consumers instead (``fxprune.passes.compensate``), and replaces the merge.

No training: ``compile(model, "functionality", budget, x, calib_loader=...)`` with ``epochs=0``
(the loader is optional with ``"ascent"``: it only fits the merge factors). ``report()`` gives the
calibration cost: forward/backward passes, examples seen, ascent steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.cluster.hierarchy import cut_tree, linkage
from scipy.spatial.distance import squareform
from tqdm.auto import tqdm

from fxprune import checks
from fxprune.budget import allocate
from fxprune.decision import Decision, Merge
from fxprune.errors import ConfigError
from fxprune.ir import ChannelGraph, ChannelGroup
from fxprune.method import Context, Method, register_method
from fxprune.scores import anchor_sites, filter_matrix

REPRESENTATIONS = ("ascent", "sample", "class")
LINKAGES = ("average", "complete", "single", "weighted")


@dataclass(frozen=True)
class FunctionalityOptions:
    representation: str = "ascent"
    ascent_steps: int = 500  # [S]
    ascent_lr: float = 0.1  # [S]
    blur_sigma: float = 0.5  # [S] 3x3 Gaussian after every step; 0 turns it off
    batches: int = 8  # calibration batches: "sample"/"class" descriptions and the merge factors
    linkage: str = "average"
    keep: str = "active"
    merge: bool = True
    widths: dict | None = None  # {group id: kept units}: instead of the budget allocation


class _Reached(Exception):
    """Raised by a hook once the last layer a group needs has run: the rest of the forward is not needed."""


@register_method
class Functionality(Method):
    """Cluster each group's units by what they respond to; keep one per cluster, merge the rest into it."""

    name = "functionality"
    Options = FunctionalityOptions
    needs_data = True

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        for option, value, allowed in (("representation", o.representation, REPRESENTATIONS),
                                       ("linkage", o.linkage, LINKAGES), ("keep", o.keep, ("active", "medoid"))):
            if value not in allowed:
                raise ConfigError(f"functionality {option} must be one of {allowed}, got {value!r}")
        if o.batches < 1 or o.ascent_steps < 1 or o.blur_sigma < 0:
            raise ConfigError("functionality batches and ascent_steps must be >= 1, blur_sigma >= 0")
        self.cost: dict[str, int] = {"forward_passes": 0, "backward_passes": 0, "examples": 0, "ascent_steps": 0}

    def decide(self, ctx: Context, data: Any = None) -> Decision:
        groups = ctx.graph.prunable_groups
        ascent = self.options.representation == "ascent"
        if data is None and not ascent:
            raise ConfigError(f"functionality with representation={self.options.representation!r} reads "
                              "calibration data: pass calib_loader=... (or train_loader) to compile, or "
                              "data=... to finalize; representation='ascent' needs none")
        grams: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        described = {}
        if data is not None and (not ascent or self.options.merge):
            described, grams = self._calibrate(ctx, groups, data, describe=not ascent)
        if ascent:
            described = self._ascent(ctx, groups)
        distances = {gid: _distances(vectors) for gid, (vectors, _) in described.items()}
        trees = {gid: _tree(d, self.options.linkage) for gid, d in distances.items()}
        counts = self._widths(ctx, groups, trees)
        keep, merge = {}, {}
        for g in groups:
            keep[g.id], into = _representatives(trees[g.id], distances[g.id], described[g.id][1], counts[g.id],
                                                self.options.keep)
            if self.options.merge and (into >= 0).any():
                merge[g.id] = Merge(into, _merge_scales(ctx.graph, grams, g.id, into))
        return Decision(keep, merge=merge)

    def report(self, ctx: Context) -> dict[str, Any]:
        return {"representation": self.options.representation, "merge": self.options.merge,
                "calibration": dict(self.cost)}

    def _widths(self, ctx: Context, groups: list[ChannelGroup], trees: dict[int, np.ndarray]) -> dict[int, int]:
        """Kept units per group: ``widths`` as given, else the allocator on the trees' merge heights (removing
        one more unit costs the next merge; the last unit is never merged away)."""
        if self.options.widths is None:
            heights = {gid: np.append(np.sort(z[:, 2]), np.inf) for gid, z in trees.items()}
            return {gid: int(m.sum()) for gid, m in allocate(ctx.cost, ctx.targets, heights).items()}
        sizes = {g.id: g.size for g in groups}
        widths = {int(k): int(v) for k, v in self.options.widths.items()}
        bad = {k: v for k, v in widths.items() if k not in sizes or not 1 <= v <= sizes[k]}
        if bad:
            raise ConfigError(f"functionality widths {bad} name no prunable group or leave it outside 1..its size; "
                              f"prunable groups and sizes: {sizes}")
        return {gid: widths.get(gid, size) for gid, size in sizes.items()}

    # ---- descriptions ------------------------------------------------------------------------------
    def _calibrate(self, ctx: Context, groups: list[ChannelGroup], data: Any, describe: bool):
        """One pass over the calibration batches: per group (units x features) response descriptions and
        each unit's response spread (if ``describe``), and per consumer the Gram matrix of its inputs."""
        gm, cg = ctx.module, ctx.graph
        modules = dict(gm.named_modules())
        sites = anchor_sites(gm, cg, groups) if describe else []
        per_site: dict[int, list[torch.Tensor]] = {k: [] for k in range(len(sites))}
        grams: dict[str, list[Any]] = {}
        handles = []
        for k, (_, site, target) in enumerate(sites):
            handles.append(modules[target].register_forward_hook(
                lambda _m, _i, out, k=k, d=site.dim: per_site[k].append(_positions(out.detach(), d).mean(2).double())))
        for layer in _consumers(cg):
            grams[layer.module_path] = [layer.in_ids, 0.0]

            def gram(_m, inp, path=layer.module_path, conv=layer.kind == "conv"):
                x = inp[0].detach().double()
                x = x.movedim(1, 0).flatten(1) if conv else x.flatten(0, -2).T  # positions x samples
                grams[path][1] = grams[path][1] + x @ x.T
            handles.append(modules[layer.module_path].register_forward_pre_hook(gram))
        labels: list[torch.Tensor] = []
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
        described: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if describe:
            y = torch.cat(labels).numpy()
            parts: dict[int, list[np.ndarray]] = {g.id: [] for g in groups}
            spread = {g.id: np.zeros(g.size) for g in groups}
            sizes = {g.id: g.size for g in groups}
            for k, (gid, site, _) in enumerate(sites):
                units = _per_unit(torch.cat(per_site[k]).numpy().T, site.units, sizes[gid])  # units x examples
                spread[gid] += units.std(1)
                if self.options.representation == "class":
                    units = np.stack([units[:, y == c].mean(1) for c in np.unique(y)], 1)
                parts[gid].append(units)
            described = {gid: (np.concatenate(v, 1), spread[gid]) for gid, v in parts.items() if v}
            for g in groups:  # no producer output a hook can read (a functional conv): its filters describe it
                if g.id not in described:
                    filters = filter_matrix(gm, cg, g)
                    described[g.id] = (filters, np.linalg.norm(filters, axis=1))
        return described, {path: (ids, np.asarray(g)) for path, (ids, g) in grams.items() if not np.isscalar(g)}

    def _ascent(self, ctx: Context, groups: list[ChannelGroup]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Per group: each unit's feature-interest pattern (the blurred input that maximises its feature map)
        and the maximised activation."""
        gm = ctx.module
        modules = dict(gm.named_modules())
        example = next(t for t in ctx.example_inputs if isinstance(t, torch.Tensor))
        blur = _gaussian(self.options.blur_sigma, example.shape[1]) if example.dim() == 4 else None
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
                x = torch.zeros((g.size, *example.shape[1:]), dtype=example.dtype, requires_grad=True)  # constant
                opt = torch.optim.SGD([x], lr=self.options.ascent_lr)
                acts: dict[int, torch.Tensor] = {}

                def record(_m, _i, o, k: int, d: int) -> None:
                    acts[k] = _positions(o, d).sum(2)  # the feature map's sum, per channel
                    if len(acts) == len(sites):
                        raise _Reached
                handles = [modules[target].register_forward_hook(
                    lambda m, i, o, k=k, d=site.dim: record(m, i, o, k, d)) for k, (_, site, target) in enumerate(sites)]

                def goal() -> torch.Tensor:
                    acts.clear()
                    try:
                        gm(x)
                    except _Reached:
                        pass
                    self.cost["forward_passes"] += 1
                    # input i maximises unit i at every site that writes it
                    return sum(_unit_diagonal(acts[k], site.units, g.size) for k, (_, site, _t) in enumerate(sites))
                try:
                    for _ in range(self.options.ascent_steps):
                        opt.zero_grad(set_to_none=True)
                        (-goal().sum()).backward()
                        opt.step()
                        if blur is not None:
                            with torch.no_grad():
                                x.copy_(F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), blur, groups=x.shape[1]))
                        self.cost["backward_passes"] += 1
                        self.cost["ascent_steps"] += 1
                    with torch.no_grad():
                        strength = goal()
                finally:
                    for h in handles:
                        h.remove()
                out[g.id] = (x.detach().flatten(1).double().numpy(), strength.double().numpy())
        finally:
            for p, r in zip(gm.parameters(), requires):
                p.requires_grad_(r)
            gm.train(was_training)
        return out


def _consumers(cg: ChannelGraph) -> list[Any]:
    """The conv/linear layers a merge can change (one per weight): ungrouped, not transposed."""
    seen: set[str] = set()
    out = []
    for layer in cg.layers:
        if layer.module_path and layer.kind in ("conv", "linear") and layer.groups == 1 and layer.weight not in seen:
            seen.add(layer.weight)
            out.append(layer)
    return out


def _merge_scales(cg: ChannelGraph, grams: dict[str, tuple[np.ndarray, np.ndarray]], gid: int,
                  into: np.ndarray) -> np.ndarray:
    """Least-squares factor of each merged unit's consumer input on its representative's, over every
    consumer's Gram matrix (aligned positions of the two units); 1 where no data was read."""
    if not grams:
        return np.where(into >= 0, 1.0, 0.0)
    num, den = np.zeros(len(into)), np.zeros(len(into))
    for ids, gram in grams.values():
        gids, uids = cg.units.lookup(ids)
        for u in np.nonzero(into >= 0)[0]:
            src = np.nonzero((gids == gid) & (uids == u))[0]
            dst = np.nonzero((gids == gid) & (uids == into[u]))[0]
            if len(src) and len(src) == len(dst):
                num[u] += gram[src, dst].sum()
                den[u] += gram[dst, dst].sum()
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def _positions(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(examples, channels, positions) view of an activation whose channels are along ``dim``."""
    t = t.movedim(dim, 1)
    return t.reshape(t.shape[0], t.shape[1], -1)


def _gaussian(sigma: float, channels: int) -> torch.Tensor:
    """A normalised 3x3 Gaussian kernel per input channel (depthwise); the identity for sigma 0."""
    if sigma == 0:
        k = torch.zeros(3, 3)
        k[1, 1] = 1.0
    else:
        r = torch.tensor([-1.0, 0.0, 1.0])
        k = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma**2))
        k = k / k.sum()
    return k.expand(channels, 1, 3, 3).contiguous()


def _per_unit(rows: np.ndarray, units: np.ndarray, size: int) -> np.ndarray:
    """Channel rows summed into their units (a unit may hold several channels of a grouped conv)."""
    out = np.zeros((size, rows.shape[1]))
    np.add.at(out, units, rows)
    return out


def _unit_diagonal(act: torch.Tensor, units: np.ndarray, size: int) -> torch.Tensor:
    """For input i, the activation of unit i (summed over its channels at this site)."""
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


def _tree(d: np.ndarray, method: str) -> np.ndarray:
    """Hierarchical merges of the units on distances ``d`` (scipy's linkage matrix; empty for one unit)."""
    if len(d) < 2:
        return np.zeros((0, 4))
    return linkage(squareform(d, checks=False), method=method)


def _representatives(tree: np.ndarray, d: np.ndarray, activity: np.ndarray, k: int,
                     rule: str) -> tuple[np.ndarray, np.ndarray]:
    """Keep mask with one unit per cluster when the tree is cut into ``k`` clusters, and for every removed
    unit its cluster's representative (-1 for kept units)."""
    n = len(d)
    keep, into = np.zeros(n, dtype=bool), np.full(n, -1)
    if k >= n:
        keep[:] = True
        return keep, into
    labels = cut_tree(tree, n_clusters=k).ravel() if len(tree) else np.zeros(n, dtype=int)
    for c in np.unique(labels):
        members = np.nonzero(labels == c)[0]
        if rule == "medoid":
            best = members[np.argmin(d[np.ix_(members, members)].sum(1))]
        else:
            best = members[np.argmax(activity[members])]
        keep[best] = True
        into[members[members != best]] = best
    return keep, into
