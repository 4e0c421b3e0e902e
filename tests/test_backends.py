"""Backends: ONNX export validated in ONNX Runtime, TensorRT availability, latency measurement.

Real models and real runtimes, no mocks. Exports are checked on pruned GraphModules straight out
of finalize as well as on dense models. TensorRT / CUDA tests skip (with the BackendUnavailable
message as the reason) where those are missing.
"""
from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
import torch
import torchvision
from onnx import numpy_helper
from torch import fx, nn

import fxprune
from fxprune.backends import (ExportResult, LatencyComparison, LatencyResult, compare_latency,
                              export, measure_latency, validate_onnx)
from fxprune.backends.onnx import ort_session
from fxprune.flow.cli import main as cli_main
from fxprune.errors import BackendUnavailable, ConfigError, ExportError
from fxprune.models import build_model, calibrate_batchnorm

X64 = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
PRUNED_MODELS = ["resnet18", "mobilenet_v2", "densenet121"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tv(name: str) -> nn.Module:
    """An untrained torchvision model with BatchNorm statistics that keep activations O(1)."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=10)
    noise = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    calibrate_batchnorm(model, torch.cat([X64, noise]))
    return model


@pytest.fixture(scope="module")
def pruned() -> Callable[[str], tuple[nn.Module, fxprune.CompileResult]]:
    """name -> (dense model, its L1 compile result at 50% FLOPs), each pruned once per module."""
    cache: dict[str, tuple[nn.Module, fxprune.CompileResult]] = {}

    def get(name: str) -> tuple[nn.Module, fxprune.CompileResult]:
        if name not in cache:
            dense = _tv(name)
            result = fxprune.compile(dense, method="l1", budget=fxprune.Budget(flops=0.5),
                                     example_inputs=(X64,))
            cache[name] = (dense, result)
        return cache[name]

    return get


def _conv_net(width: int, depth: int = 4) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)]
    return nn.Sequential(*layers)


def _ort_run(path, x: torch.Tensor) -> np.ndarray:
    session = ort_session(path)
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _conv_weight_shapes(model: nn.Module) -> list[tuple[int, ...]]:
    return sorted(tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Conv2d))


def _onnx_conv_weight_shapes(path) -> list[tuple[int, ...]]:
    graph = onnx.load(str(path)).graph
    inits = {i.name: tuple(i.dims) for i in graph.initializer}
    return sorted(inits[n.input[1]] for n in graph.node if n.op_type == "Conv")


@pytest.mark.parametrize("name", PRUNED_MODELS)
def test_pruned_torchvision_export_validates_in_ort(name, pruned, tmp_path):
    dense, result = pruned(name)
    gm, report = result.model, result.report
    assert isinstance(gm, fx.GraphModule)
    assert report.pruned["flops"] <= 0.5 * report.dense["flops"]
    path = tmp_path / f"{name}_pruned.onnx"
    res = export(gm, path, backend="onnx", example_inputs=(X64,))
    assert res.max_abs_diff < 1e-3 and res.checked_batch_sizes == [1, 2] and res.dynamic_batch
    # the file holds the pruned network: every conv has the pruned width, none the dense one
    assert _onnx_conv_weight_shapes(path) == _conv_weight_shapes(gm) != _conv_weight_shapes(dense)
    # dynamic batch: the pruned export runs at batch 5 on new inputs and agrees with PyTorch
    assert ort_session(path).get_inputs()[0].shape[0] == "batch"
    x5 = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = gm(x5).numpy()
    assert ref.std() > 1e-2  # not a comparison of near-zero outputs
    got = _ort_run(path, x5)
    assert got.shape == (5, 10)
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4)


def test_pruned_export_mismatch_and_corruption_raise(pruned, tmp_path):
    dense, result = pruned("resnet18")
    gm = result.model
    path = tmp_path / "pruned.onnx"
    export(gm, path, example_inputs=(X64,))
    assert validate_onnx(path, gm, (X64,), batch_sizes=[1, 3])[0] < 1e-3
    # a PyTorch model that is not the one in the file
    with pytest.raises(ExportError, match="differs from PyTorch"):
        validate_onnx(path, dense, (X64,))
    changed = copy.deepcopy(gm)
    with torch.no_grad():
        next(m for m in changed.modules() if isinstance(m, nn.Conv2d)).weight.mul_(1.5)
    with pytest.raises(ExportError, match="differs from PyTorch"):
        validate_onnx(path, changed, (X64,))
    # a file that is valid ONNX but was tampered with: one conv's weights scaled
    proto = onnx.load(str(path))
    conv_w = next(n.input[1] for n in proto.graph.node if n.op_type == "Conv")
    init = next(i for i in proto.graph.initializer if i.name == conv_w)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, conv_w))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(proto, str(tampered))
    with pytest.raises(ExportError, match="differs from PyTorch"):
        validate_onnx(tampered, gm, (X64,))
    # a corrupted (truncated) file
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    with pytest.raises(ExportError, match="not a valid ONNX model"):
        validate_onnx(path, gm, (X64,))
    with pytest.raises(ExportError, match="does not exist"):
        validate_onnx(tmp_path / "missing.onnx", gm, (X64,))


class _BatchDependent(nn.Module):
    """Python control flow on the batch size, which the exporter bakes in at the example's batch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y * 2 if x.shape[0] == 1 else y


def test_export_that_mismatches_at_another_batch_raises(tmp_path):
    with pytest.raises(ExportError, match=r"batch 2\).*differs from PyTorch"):
        export(_BatchDependent(), tmp_path / "b.onnx", example_inputs=(torch.randn(1, 3, 8, 8),))


@pytest.mark.parametrize("name", ["resnet18", pytest.param("mobilenet_v2", marks=pytest.mark.slow),
                                  pytest.param("densenet121", marks=pytest.mark.slow)])
def test_dense_torchvision_export_validates_in_ort(name, tmp_path):
    model = _tv(name).train()
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


def test_static_batch_export(tmp_path):
    model = _conv_net(8)
    res = export(model, tmp_path / "s.onnx", example_inputs=(torch.randn(2, 3, 16, 16),),
                 dynamic_batch=False)
    assert res.checked_batch_sizes == [2]
    shape = ort_session(tmp_path / "s.onnx").get_inputs()[0].shape
    assert shape == [2, 3, 16, 16]


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


def test_compile_validate_onnxruntime_reports_measured_latency():
    torch.manual_seed(0)
    model = build_model("resnet20", 10).eval()
    x = torch.randn(1, 3, 32, 32)
    # widths in multiples of 16 (ONNX Runtime's AVX-512 channel block): half the FLOPs is faster
    result = fxprune.compile(model, method="l1", budget=fxprune.Budget(flops=0.5, round_to=16),
                             example_inputs=(x,), validate=["onnxruntime"])
    report = result.report
    lat = report.latency
    assert lat is not None and lat["settings"]["backend"] == "onnxruntime"
    assert lat["settings"]["threads"] == 1 and lat["settings"]["timer"] == "thread_time_ns"
    assert lat["settings"]["input_shapes"] == [[1, 3, 32, 32]]
    assert len(lat["ratios"]) == lat["rounds"] >= 3
    for side in ("dense", "pruned"):
        assert 0 < lat[side]["p10_ms"] <= lat[side]["median_ms"] <= lat[side]["p90_ms"]
        assert lat[side]["repeats"] == lat["rounds"] * lat[side]["settings"]["repeats"]
    assert lat["speedup_min"] <= lat["speedup"] <= lat["speedup_max"]
    assert lat["speedup"] > 1.2, lat
    assert report.seconds["validate"] > 0
    assert json.loads(report.to_json())["latency"]["speedup"] == lat["speedup"]
    assert f"speedup {lat['speedup']:.2f}x" in report.summary()
    one = fxprune.compile(model, method="l1", budget=fxprune.Budget(flops=0.5), example_inputs=(x,),
                          validate="onnxruntime")  # a single name, not a list of its letters
    assert one.report.latency["settings"]["backend"] == "onnxruntime"
    with pytest.raises(ConfigError, match="onnxruntime, torch"):
        fxprune.compile(model, method="l1", budget=fxprune.Budget(flops=0.5),
                        example_inputs=(x,), validate=["openvino"])


def test_cli_compile_exports_onnx_and_measures_latency(tmp_path):
    rc = cli_main(["compile", "--model", "resnet20", "--dataset", "digits", "--method", "l1",
                   "--flops", "0.5", "--epochs", "0", "--finetune-epochs", "0", "--export", "onnx",
                   "--validate", "onnxruntime", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    assert {p.name for p in tmp_path.iterdir()} >= {"model.pt", "model.onnx", "report.json",
                                                    "summary.txt"}
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["pruned"]["flops"] <= 0.5 * report["dense"]["flops"]
    lat = report["latency"]
    assert lat["settings"]["backend"] == "onnxruntime" and lat["speedup"] > 0
    assert lat["dense"]["median_ms"] > 0 and lat["pruned"]["median_ms"] > 0
    assert report["export"]["path"] == str(tmp_path / "model.onnx")
    assert report["export"]["max_abs_diff"] < 1e-3 and report["export"]["checked_batch_sizes"] == [1, 2]
    summary = (tmp_path / "summary.txt").read_text()
    assert "latency (onnxruntime): speedup" in summary and "model.onnx" in summary
    # the exported file is the saved pruned model, and runs at another batch size
    model = torch.load(tmp_path / "model.pt", weights_only=False).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(_ort_run(tmp_path / "model.onnx", x), ref, rtol=1e-3, atol=1e-4)


def test_cli_rejects_unknown_validate_backend(capsys):
    with pytest.raises(SystemExit):
        cli_main(["compile", "--validate", "openvino"])
    assert "invalid choice: 'openvino'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the GPU table can run")
def test_latency_benchmark_without_gpu_says_backend_unavailable(capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "latency.py"
    spec = importlib.util.spec_from_file_location("latency_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--backend", "torch-cuda"]) == 2
    err = capsys.readouterr().err
    assert "BackendUnavailable" in err and "needs a CUDA GPU" in err


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
