"""Importance criteria over a channel group: one score per unit, higher means more important.

Every criterion scores each producer of the group (a conv/linear whose output channels are the
group's units) and sums over producers, so a residual stream's unit is as important as all the
filters that write it. ``normalized`` makes groups comparable for a global ranking (each group's
scores over their mean), which is how ``l1`` and the regularization methods allocate a budget.

    >>> import torch, torch.nn as nn, fxprune
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    >>> gm = fxprune.trace(net, (torch.randn(1, 3, 8, 8),))
    >>> cg = fxprune.analyze(gm)
    >>> fxprune.scores.score("l1", gm, cg, cg.prunable_groups[0]).shape
    (8,)
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.fx as fx

from fxprune import checks
from fxprune.errors import ConfigError
from fxprune.ir import ChannelGraph, ChannelGroup, Layer
from fxprune.rules.base import gate_anchor

PerFilter = Callable[[torch.Tensor], np.ndarray]  # a producer's weight, out dim first -> score per filter


def _filters(gm: fx.GraphModule, layer: Layer) -> torch.Tensor:
    """The layer's weight as [out channels, everything else]."""
    w = gm.get_parameter(layer.weight).detach()
    out_dim = 1 if layer.kind == "conv_transpose" else 0
    return w.movedim(out_dim, 0).reshape(w.shape[out_dim], -1).double()


def producers(gm: fx.GraphModule, cg: ChannelGraph, group: ChannelGroup) -> Iterable[tuple[Any, Layer]]:
    """``(site, layer)`` for every conv/linear that produces ``group``'s channels in ``gm``.
    Raises nothing of its own."""
    layers = {l.node: l for l in cg.layers}
    names = {n.name for n in gm.graph.nodes}
    for site in group.sites:
        if site.node in layers and site.node in names:
            yield site, layers[site.node]


def per_filter_score(gm: fx.GraphModule, cg: ChannelGraph, group: ChannelGroup, fn: PerFilter) -> np.ndarray:
    """Sum over the group's producers of ``fn(filters)``, accumulated per unit. Raises nothing of
    its own (``gm`` and ``cg`` come from ``trace``/``analyze``, which check the model)."""
    scores = np.zeros(group.size)
    for site, layer in producers(gm, cg, group):
        np.add.at(scores, site.units, fn(_filters(gm, layer)))
    return scores


def _l1(w: torch.Tensor) -> np.ndarray:
    return w.abs().sum(1).numpy()


def _l2(w: torch.Tensor) -> np.ndarray:
    return w.norm(dim=1).numpy()


def _fpgm(w: torch.Tensor) -> np.ndarray:
    """Filter pruning via geometric median (He et al., CVPR 2019): a filter close to all the
    others (summed distance) is replaceable by them, so it scores low."""
    return torch.cdist(w, w).sum(1).numpy()


def anchor_sites(gm: fx.GraphModule, cg: ChannelGraph, groups: list[ChannelGroup]) -> list[tuple[int, Any, str]]:
    """``(group id, site, module)`` for every producer of ``groups`` whose output, after its norm
    (where a gate would sit), is a module's output: where a forward hook reads the group's
    activations. Raises nothing of its own."""
    modules = dict(gm.named_modules())
    nodes = {n.name: n for n in gm.graph.nodes}
    found = []
    for g in groups:
        for site, _ in producers(gm, cg, g):
            anchor = gate_anchor(gm, nodes[site.node], modules)
            if anchor.op == "call_module":
                found.append((g.id, site, anchor.target))
    return found


def filter_matrix(gm: fx.GraphModule, cg: ChannelGraph, group: ChannelGroup) -> np.ndarray:
    """Units x features: every producer's filters of each unit, side by side (a data-free
    description of what a unit computes). Raises nothing of its own."""
    parts = []
    for site, layer in producers(gm, cg, group):
        filters = _filters(gm, layer).numpy()
        per_unit = np.zeros((group.size, filters.shape[1]))
        np.add.at(per_unit, site.units, filters)
        parts.append(per_unit)
    return np.concatenate(parts, 1) if parts else np.zeros((group.size, 1))


def l1(gm: fx.GraphModule, cg: ChannelGraph, group: ChannelGroup, data: Any = None) -> np.ndarray:
    """Filter L1 norm (Li et al., ICLR 2017). Raises nothing of its own."""
    return per_filter_score(gm, cg, group, _l1)


def l2(gm: fx.GraphModule, cg: ChannelGraph, group: ChannelGroup, data: Any = None) -> np.ndarray:
    """Filter L2 norm. Raises nothing of its own."""
    return per_filter_score(gm, cg, group, _l2)


def fpgm(gm: fx.GraphModule, cg: ChannelGraph, group: ChannelGroup, data: Any = None) -> np.ndarray:
    """Filters far from the group's geometric median score high (``_fpgm``). Raises nothing of its own."""
    return per_filter_score(gm, cg, group, _fpgm)


def normed_producers(gm: fx.GraphModule, cg: ChannelGraph,
                     group: ChannelGroup) -> Iterable[tuple[Any, Layer, torch.nn.Module | None]]:
    """``(site, layer, norm)`` for every producer of ``group``: ``norm`` is the per-channel affine
    norm that is the producer's only user (where a gate sits), or None. Raises nothing of its own."""
    modules = dict(gm.named_modules())
    nodes = {n.name: n for n in gm.graph.nodes}
    for site, layer in producers(gm, cg, group):
        anchor = gate_anchor(gm, nodes[site.node], modules)
        yield site, layer, None if anchor is nodes[site.node] else gm.get_submodule(anchor.target)


def bn_scale(gm: fx.GraphModule, cg: ChannelGraph, group: ChannelGroup, data: Any = None) -> np.ndarray:
    """|gamma| of the norm right after each producer (network slimming, Liu et al., ICCV 2017).

    Producers without such a norm contribute their filter L1 norm scaled to the mean |gamma| of
    the others; a group without any norm falls back to L1 (this library's choice).
    Raises nothing of its own."""
    scores, missing = np.zeros(group.size), []
    for site, layer, norm in normed_producers(gm, cg, group):
        if norm is None:
            missing.append((site, layer))
            continue
        np.add.at(scores, site.units, norm.weight.detach().abs().double().numpy())
    if missing:
        scale = scores[scores > 0].mean() if (scores > 0).any() else 1.0
        for site, layer in missing:
            l1_scores = _l1(_filters(gm, layer))
            np.add.at(scores, site.units, scale * l1_scores / max(l1_scores.mean(), 1e-12))
    return scores


def conv_bn(gm: fx.GraphModule, cg: ChannelGraph, group: ChannelGroup, data: Any = None) -> np.ndarray:
    """Filter L1 norm times |gamma| / sqrt(running var + eps) of the norm after it: the filter's
    magnitude as the norm scales it (DSA's "conv_bn" importance; a norm without running statistics
    scales by |gamma| alone). Producers without such a norm contribute their L1 norm.
    Raises nothing of its own."""
    scores = np.zeros(group.size)
    for site, layer, norm in normed_producers(gm, cg, group):
        filters = _l1(_filters(gm, layer))
        if norm is not None:
            scale = norm.weight.detach().abs().double()
            if getattr(norm, "running_var", None) is not None:  # a norm without statistics: |gamma| alone
                scale = scale / (norm.running_var.double() + norm.eps).sqrt()
            filters = filters * scale.numpy()
        np.add.at(scores, site.units, filters)
    return scores


def random(gm: fx.GraphModule, cg: ChannelGraph, group: ChannelGroup, data: Any = None, seed: int = 0) -> np.ndarray:
    """Uniform random scores, seeded by ``seed`` and the group id (a baseline). Raises nothing."""
    return np.random.default_rng([seed, group.id]).random(group.size)


def taylor(gm: fx.GraphModule, cg: ChannelGraph, group: ChannelGroup, data: Any = None,
           batches: int = 4) -> np.ndarray:
    """First-order Taylor importance (Molchanov et al., CVPR 2019): |sum over examples and
    positions of activation x gradient| at each producer's output, on ``batches`` batches of the
    loader ``data`` with a cross-entropy loss. Needs ``data``; the model's weights are not changed.
    Raises ``ConfigError`` without data or for malformed batches (see ``fxprune.checks.batch``)."""
    return taylor_all(gm, cg, [group], data, batches)[group.id]


def taylor_all(gm: fx.GraphModule, cg: ChannelGraph, groups: list[ChannelGroup], data: Any,
               batches: int = 4) -> dict[int, np.ndarray]:
    """``taylor`` for several groups with one pass over the data. Raises ``ConfigError`` without
    data or for malformed batches."""
    if data is None:
        raise ConfigError("the taylor score needs data: pass a loader of (inputs, labels) batches")
    modules = dict(gm.named_modules())
    totals = {g.id: np.zeros(g.size) for g in groups}
    handles, sites = [], anchor_sites(gm, cg, groups)
    grads: dict[tuple[int, int], torch.Tensor] = {}

    def make_hook(key: tuple[int, int], dim: int):
        def hook(_mod, _inp, out):
            def accumulate(grad: torch.Tensor) -> None:  # sum of activation x gradient per channel
                contribution = (out * grad).detach().movedim(dim, 0).reshape(out.shape[dim], -1).sum(1)
                grads[key] = grads.get(key, 0) + contribution
            out.register_hook(accumulate)
        return hook

    for k, (gid, site, target) in enumerate(sites):
        handles.append(modules[target].register_forward_hook(make_hook((gid, k), site.dim)))
    was_training = gm.training
    gm.eval()
    try:
        for x, y in checks.batches(data, batches, "the taylor score's data"):
            gm.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(gm(x), y).backward()
    finally:
        for h in handles:
            h.remove()
        gm.zero_grad(set_to_none=True)
        gm.train(was_training)
    for k, (gid, site, _) in enumerate(sites):
        if (gid, k) in grads:
            np.add.at(totals[gid], site.units, grads[(gid, k)].abs().double().numpy())
    return totals


SCORES: dict[str, Callable[..., np.ndarray]] = {
    "l1": l1, "l2": l2, "bn_scale": bn_scale, "conv_bn": conv_bn, "fpgm": fpgm, "random": random, "taylor": taylor,
}


def score(name: str, gm: fx.GraphModule, cg: ChannelGraph, group: ChannelGroup, data: Any = None) -> np.ndarray:
    """Scores of ``group``'s units by criterion ``name`` (see ``SCORES``). Raises ``ConfigError``
    for an unknown name, or what the criterion raises."""
    if name not in SCORES:
        raise ConfigError(f"unknown importance criterion {name!r}; available: {sorted(SCORES)}")
    return SCORES[name](gm, cg, group, data)


def normalized(scores: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Each group's scores divided by their mean, so that groups rank against each other. Raises nothing."""
    return {gid: s / max(float(np.mean(s)), 1e-12) for gid, s in scores.items()}


def group_scores(name: str, gm: fx.GraphModule, cg: ChannelGraph, data: Any = None) -> dict[int, np.ndarray]:
    """Normalized scores of every prunable group (taylor: one pass over the data for all). Raises
    ``ConfigError`` as ``score`` does."""
    groups = cg.prunable_groups
    if name == "taylor":
        return normalized(taylor_all(gm, cg, groups, data))
    return normalized({g.id: score(name, gm, cg, g, data) for g in groups})
