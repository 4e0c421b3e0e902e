"""Backends: ONNX export validated in ONNX Runtime, TensorRT availability, latency measurement.

Real models and real runtimes, no mocks. TensorRT / CUDA tests skip (with the
BackendUnavailable message as the reason) where those are missing.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
import torchvision
from torch import nn

from fxprune.backends import (ExportResult, LatencyComparison, LatencyResult, compare_latency,
                              export, measure_latency, validate_onnx)
from fxprune.backends.onnx import ort_session
from fxprune.errors import BackendUnavailable, ConfigError, ExportError

X64 = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _tv(name: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None, num_classes=10)


def _conv_net(width: int, depth: int = 4) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)]
    return nn.Sequential(*layers)


def _ort_run(path, x: torch.Tensor) -> np.ndarray:
    session = ort_session(path)
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "densenet121"])
def test_torchvision_export_validates_in_ort(name, tmp_path):
    model = _tv(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = export(model, tmp_path / f"{name}.onnx", backend="onnx", example_inputs=(X64,))
    assert isinstance(res, ExportResult) and res.backend == "onnx"
    assert res.max_abs_diff < 1e-3 and res.checked_batch_sizes == [1, 2]
    assert res.opset and res.input_names == ["input"] and res.output_names == ["output"]
    onnx.checker.check_model(str(tmp_path / f"{name}.onnx"))
    json.dumps(res.to_dict())
    # the user's model is untouched: still in training mode, same weights and BN stats
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fx_graph_module_exports(tmp_path):
    gm = torch.fx.symbolic_trace(_tv("resnet18").eval())
    assert isinstance(gm, torch.fx.GraphModule)
    res = export(gm, tmp_path / "gm.onnx", example_inputs=(X64,))
    assert res.max_abs_diff < 1e-3
    with torch.no_grad():
        ref = gm(X64).numpy()
    np.testing.assert_allclose(_ort_run(tmp_path / "gm.onnx", X64), ref, rtol=1e-3, atol=1e-4)


def test_dynamic_batch_runs_batch_3(tmp_path):
    model = _tv("mobilenet_v2").eval()
    export(model, tmp_path / "m.onnx", example_inputs=(X64,), dynamic_batch=True)
    x3 = torch.randn(3, 3, 64, 64)
    got = _ort_run(tmp_path / "m.onnx", x3)
    with torch.no_grad():
        ref = model(x3).numpy()
    assert got.shape == (3, 10)
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4)


def test_static_batch_export(tmp_path):
    model = _conv_net(8)
    res = export(model, tmp_path / "s.onnx", example_inputs=(torch.randn(2, 3, 16, 16),),
                 dynamic_batch=False)
    assert res.checked_batch_sizes == [2]
    shape = ort_session(tmp_path / "s.onnx").get_inputs()[0].shape
    assert shape == [2, 3, 16, 16]


def test_corrupted_onnx_raises_export_error(tmp_path):
    model = _conv_net(8)
    x = torch.randn(1, 3, 16, 16)
    path = tmp_path / "c.onnx"
    export(model, path, example_inputs=(x,))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError):
        validate_onnx(path, model, (x,))
    with pytest.raises(ExportError):
        validate_onnx(tmp_path / "missing.onnx", model, (x,))


def test_mismatching_model_raises_export_error(tmp_path):
    x = torch.randn(1, 3, 16, 16)
    torch.manual_seed(1)
    a = _conv_net(8)
    torch.manual_seed(2)
    b = _conv_net(8)
    path = tmp_path / "a.onnx"
    export(a, path, example_inputs=(x,))
    assert validate_onnx(path, a, (x,))[0] < 1e-4
    with pytest.raises(ExportError, match="output 'output' differs"):
        validate_onnx(path, b, (x,))


def test_export_config_errors(tmp_path):
    model = _conv_net(4)
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ConfigError, match="onnx, tensorrt"):
        export(model, tmp_path / "m.bin", backend="openvino", example_inputs=(x,))
    with pytest.raises(ConfigError):
        export(model, tmp_path / "m.onnx", backend="onnx")
    with pytest.raises(ConfigError):
        export(model, tmp_path / "m.onnx", backend="onnx", example_inputs=(x,), fp16=True)


def _check_latency(res: LatencyResult, backend: str) -> None:
    assert isinstance(res, LatencyResult)
    assert 0 < res.p10_ms <= res.median_ms <= res.p90_ms
    assert res.min_ms <= res.p10_ms and res.p90_ms <= res.max_ms and res.mean_ms > 0
    assert res.settings["backend"] == backend and res.settings["threads"] == 1
    assert res.settings["timer"] == "thread_time_ns"
    json.dumps(res.to_dict())


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_measure_latency_cpu(backend):
    before = torch.get_num_threads()
    res = measure_latency(_conv_net(16), backend=backend, input_shape=(3, 32, 32), batch_size=2,
                          warmup=2, repeats=10)
    _check_latency(res, backend)
    assert res.repeats == 10 and res.settings["input_shapes"] == [[2, 3, 32, 32]]
    assert torch.get_num_threads() == before


def test_measure_latency_onnx_path(tmp_path):
    model = _conv_net(8)
    export(model, tmp_path / "m.onnx", example_inputs=(torch.randn(1, 3, 16, 16),))
    res = measure_latency(str(tmp_path / "m.onnx"), batch_size=3, warmup=1, repeats=5)
    _check_latency(res, "onnxruntime")
    assert res.settings["input_shapes"] == [[3, 3, 16, 16]]


def test_measure_latency_rejects_unknown_backend():
    with pytest.raises(ConfigError, match="onnxruntime"):
        measure_latency(_conv_net(4), backend="tvm", input_shape=(3, 8, 8))


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_compare_latency_smaller_model_is_faster(backend):
    big, small = _conv_net(64), _conv_net(8)
    cmp = compare_latency(big, small, backend=backend, rounds=3, input_shape=(3, 32, 32),
                          warmup=2, repeats=5)
    assert isinstance(cmp, LatencyComparison)
    assert cmp.speedup > 1.0 and len(cmp.ratios) == 3
    assert cmp.speedup_min <= cmp.speedup <= cmp.speedup_max
    assert cmp.dense.median_ms > cmp.pruned.median_ms
    assert cmp.dense.repeats == cmp.pruned.repeats == 15
    json.dumps(cmp.to_dict())


def test_tensorrt_export_or_unavailable(tmp_path):
    model = _conv_net(8)
    try:
        res = export(model, tmp_path / "m.engine", backend="tensorrt",
                     example_inputs=(torch.randn(1, 3, 16, 16),))
    except BackendUnavailable as err:
        msg = str(err)
        assert "pip install fxprune[tensorrt]" in msg
        assert ("tensorrt" in msg) or ("CUDA" in msg)
        pytest.skip(msg)
    assert res.backend == "tensorrt" and (tmp_path / "m.engine").is_file()
    assert (tmp_path / "m.onnx").is_file()


def test_tensorrt_latency_or_unavailable():
    try:
        res = measure_latency(_conv_net(8), backend="tensorrt", input_shape=(3, 16, 16),
                              warmup=2, repeats=5)
    except BackendUnavailable as err:
        pytest.skip(str(err))
    assert 0 < res.p10_ms <= res.median_ms <= res.p90_ms
    assert res.settings["timer"] == "cuda-events"


@pytest.mark.parametrize("compile_", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_torch_cuda_latency_or_unavailable(compile_):
    try:
        res = measure_latency(_conv_net(8), backend="torch-cuda", input_shape=(3, 16, 16),
                              warmup=2, repeats=5, compile=compile_)
    except BackendUnavailable as err:
        assert "CUDA" in str(err)
        pytest.skip(str(err))
    assert 0 < res.p10_ms <= res.median_ms <= res.p90_ms
    assert res.settings["timer"] == "cuda-events" and res.settings["device"]


@pytest.mark.slow
def test_dynamo_exporter_also_validates(tmp_path):
    res = export(_tv("resnet18"), tmp_path / "d.onnx", example_inputs=(X64,), exporter="dynamo")
    assert res.exporter == "dynamo" and res.max_abs_diff < 1e-3
