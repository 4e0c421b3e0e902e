"""Validation at the API boundary: every public entry point checks what it was handed here,
before any long work, so a mistake becomes one ``ConfigError`` that names the argument and
says what to do, instead of a crash deep in torch or, worse, a silently wrong result.

One place for these checks means ``trace``, ``prepare``, ``compile``, the trainer, ``export``
and the CLI agree on what a valid model, input, batch and output path are. Nothing here
modifies what it checks.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from fxprune.errors import ConfigError, FxpruneWarning

# Module hook tables that change or observe what a forward computes.
_HOOK_TABLES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _shapes(tensors: Sequence[Any]) -> list[Any]:
    return [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in tensors]


def _first(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def example_inputs(inputs: Any, where: str) -> tuple[Any, ...]:
    """``inputs`` as a tuple (a bare tensor is one input); refused when empty, without a tensor,
    on the meta device or holding NaN/Inf (a pruning decision and its check need real values)."""
    if isinstance(inputs, (torch.Tensor, np.ndarray)):
        inputs = (inputs,)
    if isinstance(inputs, (tuple, list)) and any(isinstance(t, np.ndarray) for t in inputs):
        raise ConfigError(f"{where}: example_inputs hold numpy arrays; convert them with torch.from_numpy(array)")
    if inputs is None or isinstance(inputs, (str, bytes, dict)) or not hasattr(inputs, "__iter__"):
        raise ConfigError(f"{where}: example_inputs must be a tensor or a tuple of tensors, got "
                          f"{type(inputs).__name__}; e.g. example_inputs=(torch.randn(1, 3, 224, 224),)")
    inputs = tuple(inputs)
    tensors = [t for t in _nested(inputs) if isinstance(t, torch.Tensor)]
    if not tensors:
        got = "nothing" if not inputs else ", ".join(type(t).__name__ for t in inputs)
        raise ConfigError(f"{where} needs example_inputs with at least one torch.Tensor, got {got}; "
                          "e.g. example_inputs=(torch.randn(1, 3, 224, 224),) (convert numpy arrays with "
                          "torch.from_numpy)")
    for i, t in _indexed(inputs):
        if t.is_meta:
            raise ConfigError(f"{where}: example_inputs[{i}] is on the meta device (shape {tuple(t.shape)}, no "
                              "values); pass a real tensor, e.g. torch.randn(...) on the model's device")
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ConfigError(f"{where}: example_inputs[{i}] (shape {tuple(t.shape)}) holds {bad} NaN/Inf "
                              "values; pruning decisions and the equivalence check need finite inputs: pass "
                              "real data or torch.randn(...)")
    return inputs


def _nested(value: Any) -> list[Any]:
    """The leaves of nested lists, tuples and dicts (a detector takes a list of images)."""
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in _nested(v)]
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _nested(v)]
    return [value]


def _indexed(inputs: tuple[Any, ...]) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of the example inputs with its place, ``0`` or ``0][1`` (in a list)."""
    out: list[tuple[str, torch.Tensor]] = []

    def walk(value: Any, where: str) -> None:
        if isinstance(value, torch.Tensor):
            out.append((where, value))
        elif isinstance(value, (list, tuple)):
            for j, v in enumerate(value):
                walk(v, f"{where}][{j}")
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{where}][{k!r}")
    for i, v in enumerate(inputs):
        walk(v, str(i))
    return out


def module_arg(value: Any, where: str) -> nn.Module:
    """``value`` if it is an ``nn.Module``; else a ``ConfigError`` naming the usual mix-ups (a
    result object holding the model, the class instead of an instance)."""
    if isinstance(value, nn.Module):
        return value
    hint = ""
    if hasattr(value, "model") and isinstance(getattr(value, "model"), nn.Module):
        hint = f" (this {type(value).__name__} holds one: pass result.model)"
    elif isinstance(value, type) and issubclass(value, nn.Module):
        hint = f" (this is the class {value.__name__}: pass an instance, e.g. {value.__name__}())"
    raise ConfigError(f"{where} expects an nn.Module, got {type(value).__name__}{hint}")


def model(module: Any, where: str) -> nn.Module:
    """The module to trace: refuses what is not an ``nn.Module`` (naming the usual mix-ups), unwraps
    DataParallel / DistributedDataParallel with a warning, refuses meta-device weights and
    hook-based weight/spectral norm (a copy cannot carry them), and warns about parametrized
    modules (traced through, their channels stay)."""
    module = module_arg(module, where)
    if isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        warnings.warn(f"{where}: pruning the module inside {type(module).__name__} (model.module); the result is "
                      "not wrapped: wrap it again for multi-GPU training", FxpruneWarning, stacklevel=3)
        module = module.module
    meta = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if meta:
        raise ConfigError(f"{where}: {len(meta)} parameters/buffers are on the meta device ({_first(meta)}); "
                          "they have no values to rank or check: materialise the model first "
                          "(model.to_empty(device='cpu') then load_state_dict(...))")
    for name, mod in module.named_modules():
        for hook in mod._forward_pre_hooks.values():
            kind = type(hook).__name__
            if kind in ("WeightNorm", "SpectralNorm"):
                fix = "remove_weight_norm" if kind == "WeightNorm" else "remove_spectral_norm"
                raise ConfigError(
                    f"{where}: module '{name or type(module).__name__}' ({type(mod).__name__}) uses the hook-based "
                    f"torch.nn.utils.{'weight_norm' if kind == 'WeightNorm' else 'spectral_norm'}, whose weight is "
                    f"recomputed by a forward pre-hook that a copy cannot carry; call torch.nn.utils.{fix}(module) "
                    "on a copy before pruning, or use the torch.nn.utils.parametrizations version")
    parametrized = [f"'{name}' ({', '.join(mod.parametrizations)})" for name, mod in module.named_modules()
                    if parametrize.is_parametrized(mod)]
    if parametrized:
        warnings.warn(f"{where}: parametrized modules {_first(parametrized)} keep all their channels (fxprune does not "
                      "slice a parametrized tensor); to prune them, fold the parametrization on a copy first: "
                      "torch.nn.utils.parametrize.remove_parametrizations(module, name)", FxpruneWarning, stacklevel=3)
    return module


def finite_state(module: nn.Module, where: str) -> None:
    """Refuse NaN/Inf in parameters or buffers, naming them: a pruned copy of a broken model
    would compare equal to it only because NaN makes every comparison vacuous."""
    bad = [n for n, t in list(module.named_parameters()) + list(module.named_buffers())
           if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t.detach()).all())]
    if bad:
        raise ConfigError(f"{where}: the model's {_first(bad)} hold NaN/Inf values; fix or reload the weights "
                          "(a diverged checkpoint?) before pruning")


def _user_hooks(mod: nn.Module) -> dict[str, list[int]]:
    """Hook-table name -> keys of the hooks a user registered on ``mod``. A hook that is a method
    of the module itself is its own machinery (a lazy module's initialisation) and stays."""
    found = {}
    for table in _HOOK_TABLES:
        keys = [k for k, h in getattr(mod, table, {}).items() if getattr(h, "__self__", None) is not mod]
        if keys:
            found[table] = keys
    return found


def user_hooks(module: nn.Module) -> list[str]:
    """``'name (kind)'`` for every module of ``module`` with forward/backward hooks registered."""
    found = []
    for name, mod in module.named_modules():
        kinds = [t.strip("_").replace("_hooks", "") for t in _user_hooks(mod)]
        if kinds:
            found.append(f"'{name or type(module).__name__}' ({', '.join(kinds)})")
    return found


def drop_hooks(module: nn.Module) -> None:
    """Remove the user's hooks from ``module``'s tree (a private copy: hooks are not part of the
    graph, and running a user's hook while tracing writes proxies or values into the user's objects)."""
    for mod in module.modules():
        for table, keys in _user_hooks(mod).items():
            for key in keys:
                del getattr(mod, table)[key]
                for extra in ("_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
                              "_forward_hooks_always_called"):
                    getattr(mod, extra, {}).pop(key, None)


def batch(item: Any, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader's batch as ``(inputs, labels)``; anything else is named, with how to adapt it."""
    if isinstance(item, dict):
        raise ConfigError(f"{where} yields dict batches (keys {sorted(map(str, item))}); fxprune's trainer expects "
                          "(inputs, labels) pairs: make the dataset return (image, label) tuples, or train in your "
                          "own loop with fxprune.prepare")
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        what = f"a {type(item).__name__}" + (f" of {len(item)}" if isinstance(item, (tuple, list)) else "")
        raise ConfigError(f"{where} yields {what}; fxprune's trainer expects (inputs, labels) pairs: make the dataset "
                          "return (image, label), or train in your own loop with fxprune.prepare")
    inputs, labels = item
    for name, t in (("inputs", inputs), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise ConfigError(f"{where}: batch {name} are a {type(t).__name__}, expected a torch.Tensor (use "
                              "torchvision.transforms.ToTensor or a collate_fn that stacks them)")
    return inputs, labels


def batches(data: Any, n: int, where: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n`` batches of ``data`` as checked ``(inputs, labels)`` pairs (calibration reads)."""
    for i, item in enumerate(data):
        if i >= n:
            return
        yield batch(item, where)


def batch_matches(inputs: torch.Tensor, example: tuple[Any, ...], where: str) -> None:
    """The loader's inputs have the example's rank and channel count (the traced graph is
    specialised to the example's shape)."""
    ref = next((t for t in example if isinstance(t, torch.Tensor)), None)
    if ref is None or ref.dim() < 2:
        return
    if inputs.dim() != ref.dim() or inputs.shape[1] != ref.shape[1]:
        raise ConfigError(f"{where} yields inputs of shape {tuple(inputs.shape)}, but the model was traced with "
                          f"example_inputs of shape {tuple(ref.shape)}; make the two agree (same channels and "
                          "rank; the batch size may differ)")


def class_labels(logits: torch.Tensor, labels: torch.Tensor, where: str) -> None:
    """Class-index labels for cross-entropy: integers in [0, classes). Probabilities (same shape as
    the logits) are allowed."""
    if labels.is_floating_point() and labels.shape == logits.shape:
        return
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ConfigError(f"{where}: labels have dtype {labels.dtype} and shape {tuple(labels.shape)}; "
                          "cross-entropy needs int64 class indices (labels.long()) or class probabilities shaped "
                          f"like the outputs {tuple(logits.shape)}; pass loss_fn=... for another task")
    classes = logits.shape[1] if logits.dim() > 1 else 0
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= classes:
        raise ConfigError(f"{where}: label {hi if hi >= classes else lo} is outside [0, {classes}) — the model "
                          f"outputs {classes} classes; build the model with num_classes covering every label, or "
                          "remap the labels")


def writable_file(path: str | os.PathLike, where: str) -> Path:
    """``path`` can be written: its parent is (or can be made) a folder we may write in, and the
    path itself is not a folder. Checked before the long work, so no run fails at its end."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{where}: {path} is a folder; pass a file path such as {path / 'model.onnx'}")
    writable_dir(path.parent, where)
    return path


def writable_dir(folder: str | os.PathLike, where: str) -> Path:
    """``folder`` exists or can be created, and a file can be written in it."""
    folder = Path(folder)
    for parent in [folder, *folder.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{where}: cannot write into {folder}: {parent} is a file; choose another path")
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ConfigError(f"{where}: cannot write into {folder} ({exc.strerror or exc}); choose a writable path") from exc
    return folder
