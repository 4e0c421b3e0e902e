"""Helpers shared by the backends: input normalisation, output flattening, comparison.

Kept separate so that onnx.py, tensorrt.py and latency.py agree on what "the inputs"
and "the outputs" of a model are, and compare them with one rule.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from fxprune import checks
from fxprune.errors import ConfigError, ExportError


def as_input_tuple(example_inputs: Any, where: str = "fxprune.export") -> tuple[torch.Tensor, ...]:
    """Example inputs as a tuple of tensors (a single tensor is accepted for convenience); what
    ``fxprune.checks.example_inputs`` refuses is refused here too, and every input must be a tensor."""
    inputs = checks.example_inputs(example_inputs, where)
    for i, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor):
            raise ConfigError(f"{where}: example_inputs[{i}] is a {type(t).__name__}, expected a torch.Tensor")
    return inputs


def reference_outputs(model: nn.Module, inputs: Sequence[torch.Tensor], where: str) -> list[np.ndarray]:
    """``torch_outputs``, with a model that cannot run on the inputs reported as the inputs' fault."""
    try:
        return torch_outputs(model, inputs)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's forward on these inputs
        raise ConfigError(f"{where}: {type(model).__name__} fails on example_inputs of shapes "
                          f"{[tuple(t.shape) for t in inputs]} ({type(exc).__name__}: {exc}); pass inputs the "
                          "model accepts, e.g. the ones it was pruned with") from exc


def with_batch(inputs: Sequence[torch.Tensor], batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """The same inputs at another batch size: repeated rows (so values stay realistic), trimmed."""
    out = []
    for t in inputs:
        if t.dim() == 0:
            out.append(t)
            continue
        reps = math.ceil(batch / t.shape[0])
        big = t.repeat(reps, *([1] * (t.dim() - 1)))[:batch].clone()
        if t.is_floating_point() and batch > t.shape[0]:
            # perturb the repeated rows so a batch-mixing bug cannot hide behind identical rows
            g = torch.Generator().manual_seed(seed)
            noise = torch.randn(big.shape, generator=g, dtype=torch.float32).to(big.dtype)
            big[t.shape[0]:] += 0.1 * noise[t.shape[0]:].to(big.device)
        out.append(big)
    return tuple(out)


def eval_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode, so that exporting or timing never touches the user's module."""
    return copy.deepcopy(model).eval()


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """Tensors of a (possibly nested) model output in a stable order, as ONNX exporters see them."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flatten_outputs(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in flatten_outputs(v)]
    return []


@torch.inference_mode()
def torch_outputs(model: nn.Module, inputs: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Reference outputs of the PyTorch model as float numpy arrays."""
    return [t.detach().float().cpu().numpy() for t in flatten_outputs(model(*inputs))]


def compare(reference: Sequence[np.ndarray], actual: Sequence[np.ndarray], names: Sequence[str],
            rtol: float, atol: float, what: str) -> tuple[float, float]:
    """Check actual against reference (|a-r| <= atol + rtol*|r|); return max abs and rel diffs.

    Raises ExportError naming the first output that is out of tolerance.
    """
    if len(reference) != len(actual):
        raise ExportError(f"{what}: {len(actual)} outputs, but the PyTorch model returns {len(reference)}")
    max_abs = max_rel = 0.0
    for name, ref, act in zip(names, reference, actual):
        act = np.asarray(act, dtype=np.float64)
        ref = np.asarray(ref, dtype=np.float64)
        if ref.shape != act.shape:
            raise ExportError(f"{what}: output {name!r} has shape {tuple(act.shape)}, "
                              f"PyTorch gives {tuple(ref.shape)}")
        if ref.size == 0:
            continue
        diff = np.abs(act - ref)
        if not np.all(np.isfinite(act) == np.isfinite(ref)):
            raise ExportError(f"{what}: output {name!r} has non-finite values where PyTorch has none")
        diff = np.where(np.isfinite(diff), diff, 0.0)
        abs_d = float(diff.max())
        rel_d = float((diff / np.maximum(np.abs(ref), 1e-12)).max())
        max_abs, max_rel = max(max_abs, abs_d), max(max_rel, rel_d)
        bad = diff > atol + rtol * np.abs(ref)
        if bad.any():
            idx = np.unravel_index(int(np.argmax(np.where(bad, diff, -1.0))), diff.shape)
            raise ExportError(
                f"{what}: output {name!r} differs from PyTorch: max abs diff {abs_d:.3g}, "
                f"max rel diff {rel_d:.3g} ({int(bad.sum())} of {bad.size} values outside "
                f"atol={atol:g} + rtol={rtol:g}*|ref|; worst at index {tuple(int(i) for i in idx)})")
    return max_abs, max_rel


def io_names(n: int, stem: str) -> list[str]:
    """'input' / 'output' for one tensor, 'input_0', 'input_1', ... for several."""
    return [stem] if n == 1 else [f"{stem}_{i}" for i in range(n)]
