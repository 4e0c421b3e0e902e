"""ONNX export, validated in ONNX Runtime against the PyTorch model.

An exported file is only useful if it computes what the PyTorch module computes, so
every export is checked (onnx.checker, then ONNX Runtime on the example inputs and on a
second batch size when the batch is dynamic); any mismatch is an ExportError.

Exporter choice: the TorchScript-based exporter (``dynamo=False``) is used first. On
torch 2.15 it exports torchvision models and fx GraphModules correctly, takes ~0.5 s
for a ResNet/DenseNet where the dynamo exporter takes 7-16 s on 2 CPU cores, and
marks the batch dimension dynamic with ``dynamic_axes`` even when the example batch
is 1 (torch.export tends to specialise size-1 dims). It is deprecated, so when it is
missing or fails we fall back to the dynamo (torch.export) exporter; ``exporter=``
forces one of them.
"""
from __future__ import annotations

import contextlib
import io
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from fxprune.errors import ConfigError, ExportError
from fxprune.files import atomic_path

from ._common import as_input_tuple, compare, eval_copy, io_names, reference_outputs, torch_outputs, with_batch

_TWO_GB = 2 * 1024**3 - 64 * 1024**2  # protobuf's hard limit, with headroom for the graph itself
EXPORTERS = ("auto", "torchscript", "dynamo")


@dataclass
class ExportResult:
    """What was written and how closely the exported artifact matches PyTorch."""

    path: str
    backend: str
    max_abs_diff: float
    max_rel_diff: float
    opset: int | None
    input_names: list[str]
    output_names: list[str]
    seconds: float
    exporter: str = ""
    dynamic_batch: bool = True
    checked_batch_sizes: list[int] = field(default_factory=list)
    fp16: bool = False
    onnx_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable dict."""
        return asdict(self)


def _model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def _quiet():
    """Silence exporter chatter (deprecation warnings, dynamo progress lines on stdout)."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    return stack


def _export_torchscript(model, inputs, path, in_names, out_names, dynamic_batch, opset) -> None:
    axes = {n: {0: "batch"} for n in in_names + out_names} if dynamic_batch else None
    torch.onnx.export(model, inputs, str(path), dynamo=False, input_names=in_names,
                      output_names=out_names, dynamic_axes=axes, opset_version=opset,
                      do_constant_folding=True)


def _export_dynamo(model, inputs, path, in_names, out_names, dynamic_batch, opset, external) -> None:
    shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        shapes = tuple({0: batch} if t.dim() > 0 else None for t in inputs)
    program = torch.onnx.export(model, inputs, dynamo=True, input_names=in_names,
                                output_names=out_names, dynamic_shapes=shapes,
                                opset_version=opset, verbose=False)
    program.save(str(path), external_data=external)


def export_raw(model: nn.Module, path: str | os.PathLike, example_inputs: Any, *,
               dynamic_batch: bool = True, opset: int | None = None,
               exporter: str = "auto") -> tuple[str, list[str], list[str]]:
    """Write `model` (used as given: no copy, no eval) to `path` and run onnx.checker on it.

    Returns (exporter used, input names, output names). No numerical validation: that is
    export_onnx's job; this is also used for FP16 models that ONNX Runtime on CPU cannot run.
    """
    if exporter not in EXPORTERS:
        raise ConfigError(f"unknown ONNX exporter {exporter!r}; valid: {', '.join(EXPORTERS)}")
    inputs = as_input_tuple(example_inputs)
    path = Path(path)
    n_out = len(reference_outputs(model, inputs, "fxprune.export"))
    path.parent.mkdir(parents=True, exist_ok=True)
    in_names, out_names = io_names(len(inputs), "input"), io_names(n_out, "output")
    external = _model_bytes(model) > _TWO_GB

    order = ["torchscript", "dynamo"] if exporter == "auto" else [exporter]
    errors: list[str] = []
    used = None
    for name in order:
        try:
            with _quiet():
                if name == "torchscript":
                    _export_torchscript(model, inputs, path, in_names, out_names, dynamic_batch, opset)
                else:
                    _export_dynamo(model, inputs, path, in_names, out_names, dynamic_batch, opset,
                                   external)
            used = name
            break
        except Exception as err:  # noqa: BLE001 - any exporter failure is reported together
            errors.append(f"{name} exporter: {type(err).__name__}: {err}")
    if used is None:
        raise ExportError(f"torch.onnx.export failed for {type(model).__name__} -> {path}:\n"
                          + "\n".join(errors))
    check_onnx_file(path)
    return used, in_names, out_names


def check_onnx_file(path: str | os.PathLike) -> "Any":
    """Load and check an ONNX file (by path, so >2GB models with external data work)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"ONNX file {path} does not exist")
    try:
        onnx.checker.check_model(str(path), full_check=False)
        return onnx.load(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - DecodeError, ValidationError, ...
        raise ExportError(f"{path} is not a valid ONNX model ({type(err).__name__}: {err}); "
                          "re-export it with fxprune.export(...)") from err


def ort_session(path: str | os.PathLike, threads: int = 0, spinning: bool = True):
    """An ONNX Runtime CPU session; a file ORT cannot load is an ExportError."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - InvalidProtobuf, Fail, ...
        raise ExportError(f"ONNX Runtime cannot load {path}: {type(err).__name__}: {err}") from err


def validate_onnx(path: str | os.PathLike, model: nn.Module, example_inputs: Any, *,
                  batch_sizes: Sequence[int] | None = None, rtol: float = 1e-3,
                  atol: float = 1e-4) -> tuple[float, float]:
    """Run the ONNX file in ONNX Runtime and compare with `model` (on an eval copy).

    `batch_sizes` defaults to the example batch only. Returns (max abs diff, max rel diff).
    Raises ``ExportError`` when the file is invalid or an output is out of tolerance,
    ``ConfigError`` for bad example inputs.
    """
    check_onnx_file(path)
    session = ort_session(path)
    model = eval_copy(model)
    inputs = as_input_tuple(example_inputs)
    feeds_meta = session.get_inputs()
    if len(feeds_meta) != len(inputs):
        raise ExportError(f"{path} takes {len(feeds_meta)} inputs, {len(inputs)} example inputs given")
    out_names = [o.name for o in session.get_outputs()]
    sizes = list(batch_sizes) if batch_sizes else [inputs[0].shape[0] if inputs[0].dim() else 1]
    max_abs = max_rel = 0.0
    for b in sizes:
        x = with_batch(inputs, b) if inputs[0].dim() and b != inputs[0].shape[0] else inputs
        feeds = {m.name: t.detach().cpu().numpy() for m, t in zip(feeds_meta, x)}
        try:
            got = session.run(None, feeds)
        except Exception as err:  # noqa: BLE001
            raise ExportError(f"ONNX Runtime failed to run {path} at batch {b}: "
                              f"{type(err).__name__}: {err}") from err
        ref = torch_outputs(model, x)
        a, r = compare(ref, got, out_names, rtol, atol, f"ONNX Runtime on {Path(path).name} (batch {b})")
        max_abs, max_rel = max(max_abs, a), max(max_rel, r)
    return max_abs, max_rel


def export_onnx(model: nn.Module, path: str | os.PathLike, example_inputs: Any,
                dynamic_batch: bool = True, opset: int | None = None, rtol: float = 1e-3,
                atol: float = 1e-4, exporter: str = "auto") -> ExportResult:
    """Export `model` to one self-contained ONNX file and validate it in ONNX Runtime.

    The model is deep-copied and put in eval mode; the user's module is untouched. The file is
    written under a temporary name and renamed to `path` only after it passed validation.
    Raises ``ConfigError`` (bad inputs, or inputs the model fails on) and ``ExportError``.
    """
    start = time.perf_counter()
    inputs = as_input_tuple(example_inputs)
    work = eval_copy(model)
    b0 = int(inputs[0].shape[0]) if inputs[0].dim() else 1
    sizes = [b0] + ([3 if b0 == 2 else 2] if dynamic_batch and inputs[0].dim() else [])
    with atomic_path(path) as tmp:
        used, in_names, out_names = export_raw(work, tmp, inputs, dynamic_batch=dynamic_batch,
                                               opset=opset, exporter=exporter)
        max_abs, max_rel = validate_onnx(tmp, work, inputs, batch_sizes=sizes, rtol=rtol, atol=atol)
        proto = check_onnx_file(tmp)
    opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return ExportResult(path=str(path), backend="onnx", max_abs_diff=max_abs, max_rel_diff=max_rel,
                        opset=opset_used, input_names=in_names, output_names=out_names,
                        seconds=time.perf_counter() - start, exporter=used,
                        dynamic_batch=dynamic_batch, checked_batch_sizes=sizes, onnx_path=str(path))
