"""compensate: absorb what removed channels carried into the weights that stay, without training.

After a decision removes channels, every conv/linear that read them (a *consumer*) sees less
input. Channel-reconstruction methods (ThiNet, He et al.'s channel pruning, "Pruning with
Compensation") refit each consumer's remaining input columns so that its output on calibration
data matches the dense model's: a least-squares problem per layer. When a removed filter is an
exact copy of a kept one, the fit moves the removed filter's outgoing weights onto the kept one
and the output is unchanged: merging a redundant filter into its cluster representative is the
exact special case.

The pass works on the decision-applied gated module (``apply_decision``: removed units gated to
exact zero, every tensor at its dense shape), before finalize, so finalize's equivalence check
covers it: the finalized module is verified against the *compensated* gated module (that is what
is compared; the dense reference is what compensation fits to, not what finalize checks).

Per consumer, in graph order (a fit sees the inputs that the consumers fitted before it
produce): accumulate over ``batches`` calibration batches ``X^T X``, ``X^T Y`` and ``Y^T Y``,
where X holds the layer's kept input columns (im2col patches for a conv, ``positions`` sampled
positions per example) and Y the reference layer's output minus its bias; solve the ridge problem
``min |XW - Y|^2 + lam |W - W0|^2`` (``lam`` = ``ridge`` x the mean of diag(X^T X), pulling
toward the current weights W0 where the data does not determine them; 1e-2, 1e-4 and 1e-6 were
within one to four validation images of each other on digits-hard, 1e-4 is the default). Because
``|XW* - Y|^2 + lam |W* - W0|^2 <= |XW0 - Y|^2``, the fit never raises the layer's calibration
error; it is kept only if it lowers it (numerics), else the layer falls back to W0. Finally the
whole model's output error against the reference on the calibration data is compared with and
without compensation, and the uncompensated module is returned if compensation made it worse.

Layers it leaves as they are (and says so in the report): grouped/depthwise convs (their
pruned inputs are their pruned outputs: nothing to refit), transposed convs, non-zero padding
modes, functional calls, and layers carrying a weight mask (a refit would fill its zeros).

    >>> import torch, torch.nn as nn, fxprune, numpy as np
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    >>> with torch.no_grad():
    ...     net[0].weight[3] = net[0].weight[2]; net[0].bias[3] = net[0].bias[2]  # a duplicate filter
    >>> x = torch.randn(8, 3, 6, 6)
    >>> gm = fxprune.trace(net, (x,))
    >>> cg = fxprune.analyze(gm)
    >>> keep = {0: np.array([True, True, True, False])}  # remove the duplicate
    >>> gated = fxprune.passes.apply_decision(gm, cg, fxprune.Decision(keep))
    >>> fixed, report = fxprune.passes.compensate(gated, gm, cg, keep, [(x, torch.zeros(8))], ridge=0.0)
    >>> bool(torch.allclose(fixed(x), net(x), atol=1e-4)), report.layers["_2"]["status"]
    (True, 'fitted')
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from fxprune import checks
from fxprune.errors import ConfigError
from fxprune.ir import ChannelGraph, Layer
from fxprune.passes.sharing import replace_tensor, structural_copy
from fxprune.passes.verify import leaves


@dataclass
class CompensationReport:
    """Per consumer layer (by node): status (fitted / kept / skipped: why) and calibration errors;
    the model-level output error with and without compensation; what it cost."""

    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    output_error: dict[str, float] = field(default_factory=dict)
    used: bool = False  # False: compensation made the model worse on the calibration data
    forward_passes: int = 0
    examples: int = 0


def _consumers(cg: ChannelGraph, keep: dict[int, np.ndarray]) -> list[tuple[Layer, np.ndarray]]:
    """Layers reading a removed channel, with the survival of each of their input channels."""
    alive = cg.survivors(cg.keep_masks(keep))
    found = []
    for layer in cg.layers:
        kept = alive(layer.in_ids)
        if not kept.all():
            found.append((layer, kept))
    return found


def _skip_reason(layer: Layer, module: nn.Module | None, masked: set[str]) -> str | None:
    if layer.module_path is None or module is None:
        return "a functional call (no module to refit)"
    if layer.kind == "conv_transpose":
        return "a transposed conv"
    if layer.groups > 1:
        return "a grouped conv (its pruned inputs are its pruned outputs)"
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r}"
    if layer.weight in masked:
        return "it carries a weight mask"
    if not isinstance(module, (nn.Conv2d, nn.Linear)):
        return f"{type(module).__name__} is not nn.Conv2d / nn.Linear"
    return None


def _columns(module: nn.Module, inputs: torch.Tensor, kept: np.ndarray, pick: torch.Tensor | None) -> torch.Tensor:
    """Rows of X: the kept input columns at the sampled output positions ``pick`` of each example
    (a linear layer: every row)."""
    if isinstance(module, nn.Linear):
        return inputs.reshape(-1, inputs.shape[-1])[:, torch.as_tensor(kept)].double()
    patches = F.unfold(inputs, module.kernel_size, module.dilation, module.padding, module.stride)  # N, C*k, L
    mask = torch.as_tensor(np.repeat(kept, int(np.prod(module.kernel_size))))
    return patches[:, mask][:, :, pick].transpose(1, 2).reshape(-1, int(mask.sum())).double()


def _targets(module: nn.Module, outputs: torch.Tensor, positions: int,
             g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows of Y: the reference output minus the bias at ``positions`` sampled output positions
    per example (a linear layer: every row), and which positions were sampled."""
    if module.bias is not None:
        shape = [1, -1] + [1] * (outputs.dim() - 2) if isinstance(module, nn.Conv2d) else [-1]
        outputs = outputs - module.bias.detach().reshape(shape)
    if isinstance(module, nn.Linear):
        return outputs.reshape(-1, outputs.shape[-1]).double(), None
    flat = outputs.flatten(2)
    pick = torch.randperm(flat.shape[2], generator=g)[:positions]
    return flat[:, :, pick].transpose(1, 2).reshape(-1, outputs.shape[1]).double(), pick


def _matrix(module: nn.Module, kept: np.ndarray) -> torch.Tensor:
    """The layer's kept-column weight as (columns, outputs)."""
    w = module.weight.detach()
    if isinstance(module, nn.Linear):
        return w[:, torch.as_tensor(kept)].T.double()
    return w[:, torch.as_tensor(kept)].reshape(w.shape[0], -1).T.double()


def _error(w: torch.Tensor, xtx: torch.Tensor, xty: torch.Tensor, yty: float) -> float:
    return float(yty - 2 * (w * xty).sum() + (w * (xtx @ w)).sum())


def _run(model: nn.Module, inputs: list[torch.Tensor], hooks: dict[nn.Module, Any]) -> None:
    handles = [m.register_forward_hook(h) for m, h in hooks.items()]
    try:
        with torch.no_grad():
            for x in inputs:
                model(x)
    finally:
        for h in handles:
            h.remove()


def _outputs(model: nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [torch.cat([t.flatten(1) for t in leaves(model(x))], 1) for x in inputs]


def compensate(gated: fx.GraphModule, reference: nn.Module, channel_graph: ChannelGraph,
               keep: dict[int, np.ndarray], data: Iterable, batches: int = 8, positions: int = 64,
               ridge: float = 1e-4, weight_masks: Iterable[str] = (), progress: bool = False,
               ) -> tuple[fx.GraphModule, CompensationReport]:
    """A copy of ``gated`` (a decision-applied module, see ``apply_decision``) whose consumers of
    removed channels are refitted to ``reference``'s outputs on ``data``; ``gated`` and
    ``reference`` are not changed. Returns the module and a ``CompensationReport``.

    Raises ``ConfigError`` for missing data or a bad option, and for batches that are not
    (inputs, labels) pairs.
    """
    if data is None:
        raise ConfigError("compensate needs calibration data: a loader of (inputs, labels) batches "
                          "(calib_loader=... in compile); labels are not read")
    if batches < 1 or positions < 1 or ridge < 0:
        raise ConfigError(f"compensate: batches and positions must be >= 1 and ridge >= 0, got "
                          f"{batches}, {positions}, {ridge}")
    report = CompensationReport()
    work = structural_copy(gated)
    was = (work.training, reference.training)
    work.eval()
    reference.eval()
    try:
        # read once: a shuffling loader gives other batches on every pass, and each fit must see the
        # same examples in both models
        inputs = [x for x, _ in checks.batches(data, batches, "compensate's calibration data")]
        before = _outputs(work, inputs)
        target = _outputs(reference, inputs)
        report.forward_passes += 2 * len(before)
        report.examples = sum(int(t.shape[0]) for t in before)
        masked = set(weight_masks)
        fits = []
        for layer, kept in _consumers(channel_graph, keep):
            module = work.get_submodule(layer.module_path) if layer.module_path else None
            why = _skip_reason(layer, module, masked)
            if why is None:
                fits.append((layer, kept))
            else:
                report.layers[layer.node] = {"status": f"skipped: {why}"}
        targets = _reference_targets(reference, [layer for layer, _ in fits], inputs, positions)
        report.forward_passes += len(inputs)
        for layer, kept in tqdm(fits, desc="compensate", disable=not progress, leave=False):
            module = work.get_submodule(layer.module_path)
            report.layers[layer.node] = _fit(work, layer, module, kept, inputs, targets[layer.node], ridge)
            report.forward_passes += len(inputs)
        after = _outputs(work, inputs)
        report.forward_passes += len(after)
        err = {"without": _mse(before, target), "with": _mse(after, target)}
        report.output_error = err
        report.used = err["with"] <= err["without"]
    finally:
        work.train(was[0])
        reference.train(was[1])
    return (work if report.used else gated), report


def _mse(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return float(sum(((a - b) ** 2).sum() for a, b in zip(got, want)) / max(1, sum(b.numel() for b in want)))


def _reference_targets(reference: nn.Module, layers: list[Layer], inputs: list[torch.Tensor],
                       positions: int) -> dict[str, list[tuple[torch.Tensor, torch.Tensor | None]]]:
    """Per layer and batch: (Y rows, sampled positions) from one pass of the reference (its
    outputs do not change while the copy is refitted)."""
    g = torch.Generator().manual_seed(0)
    found: dict[str, list[tuple[torch.Tensor, torch.Tensor | None]]] = {layer.node: [] for layer in layers}

    def hook(node: str, module: nn.Module):
        return lambda _m, _i, out: found[node].append(_targets(module, out.detach(), positions, g))

    _run(reference, inputs, {(m := reference.get_submodule(layer.module_path)): hook(layer.node, m) for layer in layers})
    return found


def _fit(work: fx.GraphModule, layer: Layer, module: nn.Module, kept: np.ndarray, inputs: list[torch.Tensor],
         targets: list[tuple[torch.Tensor, torch.Tensor | None]], ridge: float) -> dict[str, Any]:
    """Refit one consumer's kept columns; replace its weight in ``work`` if the error drops."""
    ins: list[torch.Tensor] = []
    _run(work, inputs, {module: lambda _m, i, _o: ins.append(i[0].detach())})
    n_cols = int(kept.sum()) * (int(np.prod(module.kernel_size)) if isinstance(module, nn.Conv2d) else 1)
    xtx = torch.zeros(n_cols, n_cols, dtype=torch.float64)
    xty = torch.zeros(n_cols, module.weight.shape[0], dtype=torch.float64)
    yty = 0.0
    for inp, (y, pick) in zip(ins, targets):
        x = _columns(module, inp, kept, pick)
        xtx += x.T @ x
        xty += x.T @ y
        yty += float((y * y).sum())
    w0 = _matrix(module, kept)
    lam = ridge * float(xtx.diagonal().mean()) if n_cols else 0.0
    try:
        w = torch.linalg.solve(xtx + lam * torch.eye(n_cols, dtype=torch.float64), xty + lam * w0)
    except RuntimeError as exc:  # singular even with the ridge (ridge=0 and dead inputs)
        return {"status": f"kept: the fit failed ({exc})"}
    old, new = _error(w0, xtx, xty, yty), _error(w, xtx, xty, yty)
    entry = {"error_before": old / max(yty, 1e-30), "error_after": new / max(yty, 1e-30), "columns": n_cols}
    if not new < old:
        return {**entry, "status": "kept: the fit did not lower the error"}
    weight = module.weight.detach().clone()
    cols = torch.as_tensor(kept)
    fitted = w.T.to(weight.dtype)
    if isinstance(module, nn.Linear):
        weight[:, cols] = fitted
    else:
        weight[:, cols] = fitted.reshape(weight.shape[0], int(kept.sum()), *weight.shape[2:])
    replace_tensor(work, layer.weight, weight)
    return {**entry, "status": "fitted"}
