"""Weight sparsity: which weights may be zeroed, the masks that meet a sparsity target, and what a
sparse model costs.

The unit is one weight, not a channel, but the channel graph still decides what is prunable:
the weights of its conv and linear layers (each parameter once, however many layers share it),
with the first and last layer optionally kept dense, and, for N:M, only layers whose input
dimension splits into groups of M (not depthwise convs, not a 3-channel first conv). The
lookahead score (LAP) reads the channel graph for the previous and next layers of every unit.

Everything here is a pure function of tensors and the graph; the masks pass
(``fxprune.passes.masks``) applies masks to a module and the methods schedule them.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from fxprune.errors import BudgetError, ConfigError
from fxprune.schedules import cubic  # noqa: F401  (the sparsity ramp; re-exported for the weight methods)
from fxprune.ir import ChannelGraph, Layer

SCOPES = ("global", "layer")


def input_dim(layer: Layer) -> int:
    """The weight dimension that runs over the layer's input channels. Raises nothing."""
    return 0 if layer.kind == "conv_transpose" else 1


@dataclass(frozen=True)
class WeightTargets:
    """A sparsity budget resolved against one model: which weights may go and how many must.

    ``sizes``: the prunable weights (qualified parameter name -> number of elements), in graph
    order; ``skipped``: the conv/linear weights left dense and why. With ``sparsity`` the target is
    ``zeros()`` zeros (over all prunable weights for ``scope="global"``, per weight for
    ``"layer"``); with ``nm=(n, m)`` at most n of every m consecutive weights along the input
    dimension (``dims``) are non-zero.
    """

    sizes: dict[str, int]
    dims: dict[str, int]
    skipped: dict[str, str]
    sparsity: float | None = None
    scope: str = "global"
    nm: tuple[int, int] | None = None

    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    def fraction(self) -> float:
        """The target's fraction of zero weights over the prunable weights."""
        return self.sparsity if self.nm is None else 1 - self.nm[0] / self.nm[1]

    def zeros(self, sparsity: float | None = None) -> dict[str, int]:
        """Zeros per weight at ``sparsity`` (the target by default); under global scope one entry,
        ``"*"``, for all prunable weights together."""
        s = self.fraction() if sparsity is None else sparsity
        if self.scope == "global" and self.nm is None:
            return {"*": int(round(s * self.total))}
        return {name: int(round(s * n)) for name, n in self.sizes.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"sparsity": self.sparsity, "scope": self.scope, "nm": list(self.nm) if self.nm else None,
                "prunable_weights": self.total, "layers": len(self.sizes), "skipped": dict(self.skipped)}


def prunable_weights(gm: fx.GraphModule, cg: ChannelGraph, dense_ends: bool = False,
                     nm: tuple[int, int] | None = None) -> tuple[dict[str, int], dict[str, int], dict[str, str]]:
    """(sizes, input dims, skipped with reasons) of the conv/linear weights a sparsity budget covers.

    A parameter shared by several layers is one entry (one mask). ``dense_ends`` keeps the first
    and the last layer in graph order dense. Under N:M a layer qualifies only when each group of
    its input dimension (``in_per_group``) is a multiple of m. Raises ``BudgetError`` when no
    weight qualifies."""
    params = dict(gm.named_parameters())
    layers = [l for l in cg.layers if l.weight in params]
    ends = {layers[0].weight, layers[-1].weight} if dense_ends and layers else set()
    sizes: dict[str, int] = {}
    dims: dict[str, int] = {}
    skipped = {l.weight: "not a plain parameter (parametrized, e.g. weight_norm, or a buffer/constant)"
               for l in cg.layers if l.weight not in params}
    for layer in layers:
        name = layer.weight
        if name in sizes or name in skipped:
            continue
        if name in ends:
            skipped[name] = "first or last layer, kept dense (dense_ends=True)"
        elif "." not in name:
            skipped[name] = "held by the model's root module, which the masks pass does not parametrize; move it into a submodule"
        elif nm is not None and layer.in_per_group % nm[1]:
            skipped[name] = f"its {layer.in_per_group} input channel(s) per group do not split into groups of {nm[1]}"
        else:
            sizes[name] = params[name].numel()
            dims[name] = input_dim(layer)
    if not sizes:
        raise BudgetError("no conv or linear weight of this model can be sparsified under this budget "
                          f"(skipped: {skipped or 'no conv/linear layers found'}); use a channel budget "
                          "(flops=/params=), dense_ends=False, or another N:M pattern")
    return sizes, dims, skipped


# ---- masks ------------------------------------------------------------------------------------

def _lowest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` smallest entries of a 1-D tensor (ties by position, so exact)."""
    drop = torch.zeros(values.numel(), dtype=torch.bool)
    if k > 0:
        drop[torch.argsort(values, stable=True)[:k]] = True
    return drop


def magnitude_masks(scores: dict[str, torch.Tensor], zeros: dict[str, int]) -> dict[str, torch.Tensor]:
    """Keep masks (True = kept) removing the lowest scores: ``zeros["*"]`` over all weights
    together (one global threshold), or ``zeros[name]`` per weight. Exact counts, ties by position.
    Raises nothing of its own."""
    if "*" in zeros:
        flat = torch.cat([s.detach().reshape(-1).float() for s in scores.values()])
        drop = _lowest(flat, zeros["*"])
        out, at = {}, 0
        for name, s in scores.items():
            out[name] = ~drop[at:at + s.numel()].view(s.shape)
            at += s.numel()
        return out
    return {name: ~_lowest(s.detach().reshape(-1).float(), zeros[name]).view(s.shape) for name, s in scores.items()}


def nm_mask(score: torch.Tensor, n: int, m: int, dim: int, fraction: float = 1.0) -> torch.Tensor:
    """Keep mask with at most ``n`` kept in every ``m`` consecutive entries along ``dim``.

    ``fraction`` < 1 constrains only that fraction of the groups: those whose N:M pruning removes
    the least score, the others stay dense (how a gradual or cyclical schedule reaches N:M).
    Raises nothing of its own (the caller checks that ``dim`` splits into groups of m)."""
    s = score.detach().float().movedim(dim, -1)
    shape = s.shape
    groups = s.reshape(-1, m)
    kept = torch.zeros_like(groups, dtype=torch.bool)
    kept.scatter_(1, torch.topk(groups, n, dim=1, sorted=False).indices, True)
    if fraction < 1.0:
        loss = (groups * ~kept).sum(1)
        dense = ~_lowest(loss, int(round(fraction * groups.shape[0])))
        kept[dense] = True
    return kept.view(shape).movedim(-1, dim)


# ---- lookahead (LAP) ---------------------------------------------------------------------------

def _unit_keys(cg: ChannelGraph, ids: np.ndarray) -> list[tuple[int, int] | None]:
    g, u = cg.units.lookup(np.asarray(ids))
    return [(int(a), int(b)) if a >= 0 else None for a, b in zip(g, u)]


def _per_out(w: torch.Tensor, layer: Layer) -> torch.Tensor:
    """Squared norm of each output channel's filter."""
    w = w.detach().float()
    if layer.kind == "conv_transpose":  # [in, out/groups, k...]
        g = layer.groups
        w = w.reshape(g, w.shape[0] // g, w.shape[1], -1).transpose(0, 1)  # [in/g, g, out/g, k]
        return w.pow(2).sum(dim=(0, 3)).reshape(-1)
    return w.pow(2).reshape(w.shape[0], -1).sum(1)


def _per_in(w: torch.Tensor, layer: Layer) -> torch.Tensor:
    """Squared norm of everything that reads each input channel."""
    w = w.detach().float()
    if layer.kind == "conv_transpose":
        return w.pow(2).reshape(w.shape[0], -1).sum(1)
    g = layer.groups
    return w.reshape(g, w.shape[0] // g, w.shape[1], -1).pow(2).sum(dim=(1, 3)).reshape(-1)


def lookahead_scores(weights: dict[str, torch.Tensor], cg: ChannelGraph) -> dict[str, torch.Tensor]:
    """LAP (Park et al., ICLR 2020): W[i, j]^2 x (squared norm of the filters that produce input
    channel j) x (squared norm of all next-layer weights that read output channel i).

    "Previous" and "next" come from the channel graph: every layer producing (reading) a unit of
    the same channel group counts, so a residual stream's channel sums all its producers and
    readers; a channel the graph does not track (the model input, the output) has factor 1.
    ``weights``: the tensors to score by qualified name (only those are scored, and only those
    count as neighbours). Raises nothing of its own."""
    prev: dict[tuple[int, int], float] = {}
    nxt: dict[tuple[int, int], float] = {}
    keys: dict[str, tuple[list, list]] = {}  # per layer node: the units of its inputs and outputs
    for layer in cg.layers:
        w = weights.get(layer.weight)
        if w is None:
            continue
        keys[layer.node] = ins, outs = _unit_keys(cg, layer.in_ids), _unit_keys(cg, layer.out_ids)
        for key, v in zip(outs, _per_out(w, layer).tolist()):
            if key is not None:
                prev[key] = prev.get(key, 0.0) + v
        for key, v in zip(ins, _per_in(w, layer).tolist()):
            if key is not None:
                nxt[key] = nxt.get(key, 0.0) + v
    out: dict[str, torch.Tensor] = {}
    for layer in cg.layers:
        if layer.weight not in weights or layer.weight in out:
            continue
        w = weights[layer.weight].detach().float()
        ins, outs = keys[layer.node]
        in_f = torch.tensor([prev.get(k, 1.0) if k else 1.0 for k in ins])
        out_f = torch.tensor([nxt.get(k, 1.0) if k else 1.0 for k in outs])
        rows, cols, g = w.shape[0], w.shape[1], layer.groups
        # entry (i, j) of a grouped weight reaches the other side's channel (i // (rows / g)) * cols + j
        across = (torch.arange(rows) // (rows // g)).unsqueeze(1) * cols + torch.arange(cols).unsqueeze(0)
        if layer.kind == "conv_transpose":  # rows run over inputs
            factor = in_f.unsqueeze(1) * out_f[across]
        else:
            factor = out_f.unsqueeze(1) * in_f[across]
        out[layer.weight] = w.pow(2) * factor.view(rows, cols, *([1] * (w.dim() - 2)))
    return out


# ---- measuring ----------------------------------------------------------------------------------

@dataclass
class SparsityReport:
    """What a sparse model holds, counted on its weights: zeros per prunable weight and overall,
    MACs that multiply a non-zero weight, and bytes stored dense vs sparse (non-zero values plus a
    one-bit-per-weight mask, both in a ``torch.save`` file)."""

    target: dict[str, Any]
    layers: dict[str, dict[str, float]] = field(default_factory=dict)
    overall: float = 0.0
    nonzero_macs: int = 0
    dense_macs: int = 0
    bytes_dense: int = 0
    bytes_sparse: int = 0
    empty: list[str] = field(default_factory=list)  # prunable tensors left without a non-zero weight


def saved_bytes(state: dict[str, torch.Tensor]) -> int:
    """Size of ``state`` written by ``torch.save``. Raises nothing of its own."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.tell()


def measure(model: torch.nn.Module, targets: WeightTargets, layer_macs: dict[str, int]) -> SparsityReport:
    """Zeros of ``model``'s prunable weights (``targets.sizes``), its non-zero MACs (``layer_macs``:
    dense MACs per example of the layers that use each weight), and its stored size.
    Raises nothing of its own."""
    params = dict(model.named_parameters())
    report = SparsityReport(target=targets.to_dict())
    zeros_all = 0
    for name in targets.sizes:
        w = params[name].detach()
        zeros = int((w == 0).sum())
        zeros_all += zeros
        report.layers[name] = {"size": w.numel(), "zeros": zeros, "sparsity": zeros / w.numel()}
    report.overall = zeros_all / max(1, targets.total)
    report.empty = [name for name, r in report.layers.items() if r["zeros"] == r["size"]]
    for name, macs in layer_macs.items():
        w = params.get(name)
        density = float((w != 0).sum()) / w.numel() if w is not None and name in targets.sizes else 1.0
        report.dense_macs += macs
        report.nonzero_macs += int(round(macs * density))
    state = {k: v.detach() for k, v in model.state_dict().items()}
    report.bytes_dense = saved_bytes(state)
    sparse = {}
    for k, v in state.items():
        if k in targets.sizes:
            nz = v != 0
            sparse[k + ".values"] = v[nz]
            sparse[k + ".mask"] = torch.from_numpy(np.packbits(nz.reshape(-1).numpy()))
        else:
            sparse[k] = v
    report.bytes_sparse = saved_bytes(sparse)
    return report


def check(report: SparsityReport, targets: WeightTargets, model: torch.nn.Module) -> None:
    """Raises ``BudgetError`` when ``model`` holds fewer zeros than ``targets`` ask (globally, per
    layer, or in some group of m under N:M)."""
    short: list[str] = []
    if targets.nm is not None:
        n, m = targets.nm
        params = dict(model.named_parameters())
        for name, dim in targets.dims.items():
            groups = (params[name].detach() != 0).movedim(dim, -1).reshape(-1, m).sum(1)
            if int(groups.max()) > n:
                short.append(f"{name}: {int((groups > n).sum())} groups of {m} hold more than {n} non-zeros")
    else:
        for key, want in targets.zeros().items():
            got = sum(r["zeros"] for r in report.layers.values()) if key == "*" else report.layers[key]["zeros"]
            if got < want:
                short.append(f"{'all prunable weights' if key == '*' else key}: {got:,} zeros < {want:,}")
    if short:
        raise BudgetError("the finalized model misses its sparsity budget (counted on its weights): "
                          + "; ".join(short[:5]) + ("; ..." if len(short) > 5 else "")
                          + ". Its method's decide must return weight masks that meet ctx.targets.weights")


def parse_nm(text: str) -> tuple[int, int]:
    """``"2:4"`` as ``(2, 4)``. Raises ``ConfigError`` for anything but n:m with 0 < n < m."""
    n, _, m = text.partition(":")
    if not (n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
        raise ConfigError(f"N:M pattern {text!r}: expected n:m with 0 < n < m, e.g. 2:4")
    return int(n), int(m)


def check_options(sparsity: Any, scope: Any, nm: Any) -> tuple[int, int] | None:
    """Validate the sparsity fields of a Budget; returns ``nm`` as a tuple. Raises ``ConfigError``."""
    if sparsity is not None and (isinstance(sparsity, bool) or not isinstance(sparsity, (int, float))
                                 or not 0 < sparsity < 1 or not math.isfinite(sparsity)):
        raise ConfigError(f"Budget sparsity={sparsity!r}: must be the fraction of zero weights, in (0, 1), "
                          "e.g. Budget(sparsity=0.9)")
    if scope not in SCOPES:
        raise ConfigError(f"Budget scope={scope!r}: must be one of {SCOPES}")
    if nm is None:
        return None
    ok = (isinstance(nm, (tuple, list)) and len(nm) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                  for v in nm) and 0 < nm[0] < nm[1])
    if not ok:
        raise ConfigError(f"Budget nm={nm!r}: must be (n, m) with 0 < n < m, e.g. nm=(2, 4)")
    return int(nm[0]), int(nm[1])
