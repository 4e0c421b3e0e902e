"""The channel multiple of a backend: the width step at which its convolutions get cheaper.

Fast CPU kernels compute convolutions on blocks of channels (ONNX Runtime's NCHWc layout and
oneDNN use blocks of 16 floats with AVX-512 and 8 with AVX2), and GPU kernels tile channels for
tensor cores; a layer cut to a width between two multiples costs what the next multiple costs,
or more where the runtime falls back to a slower kernel. The multiple is guessed from the
instruction set where one decides it (CPU) and then *measured*: one convolution timed at a
reference width ``W`` and at ``W - M/2`` for candidate multiples ``M``. A block of ``B``
channels pads ``W - M/2`` back up to ``W`` exactly when ``M <= B``, so the multiple is the
largest ``M`` for which removing ``M/2`` channels saves nothing (ratio above ``SAME``).
Widths stay multiples of 4 so that no candidate trips ORT's fallback for odd widths. Where the
measurement and the guess disagree, the measurement wins and both are reported.
"""
from __future__ import annotations

import functools
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .runners import Bench, cpu_name, torch_threads

SAME = 0.95  # a width that costs at least this fraction of the reference costs the same (noise ~2%)


@dataclass(frozen=True)
class ChannelMultiple:
    """A backend's channel multiple and how it was found (``ratios``: width -> time / time(ref))."""

    value: int
    backend: str
    source: str  # "measured" (the guess confirmed, or corrected), "isa" (no measurement)
    isa: str
    isa_guess: int | None
    reference_width: int
    ratios: dict[int, float] = field(default_factory=dict)
    device: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cpu_isa() -> str:
    """The widest SIMD extension the CPU reports: avx512, avx2, neon or none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    flags = set(text.split())
    if "avx512f" in flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    if "neon" in flags or "asimd" in flags:
        return "neon"
    return "none"


ISA_MULTIPLE = {"avx512": 16, "avx2": 8, "neon": 4, "none": 4}  # floats per SIMD register


def pick(ratios: dict[int, float], reference: int, candidates: tuple[int, ...]) -> int:
    """The largest candidate M whose width ``reference - M/2`` still costs the reference's time.
    Candidates are checked in increasing order and the first that saves time ends the search."""
    best = 1
    for m in candidates:
        if ratios[reference - m // 2] < SAME:
            break
        best = m
    return best


def _interleaved_ratios(benches: dict[int, Bench], reference: int, rounds: int, repeats: int) -> dict[int, float]:
    for b in benches.values():
        b.run(3)
    per_round: dict[int, list[float]] = {w: [] for w in benches}
    for _ in range(rounds):
        medians = {w: statistics.median(b.run(repeats)) for w, b in benches.items()}
        for w in benches:
            per_round[w].append(medians[w] / medians[reference])
    return {w: float(statistics.median(r)) for w, r in per_round.items()}


def _onnx_conv(c_in: int, c_out: int, hw: int) -> bytes:
    """A one-Conv ONNX model (3x3, padding 1) built directly: no exporter in the loop."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((c_out, c_in, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(c_out, np.float32), "b")
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    relu = helper.make_node("Relu", ["y"], ["z"])
    graph = helper.make_graph([node, relu], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, hw, hw])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, c_out, hw, hw])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    return model.SerializeToString()


def _ort_bench(c_in: int, c_out: int, hw: int) -> Bench:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(_onnx_conv(c_in, c_out, hw), sess_options=opts, providers=["CPUExecutionProvider"])
    feeds = {"x": np.random.default_rng(1).standard_normal((1, c_in, hw, hw)).astype(np.float32)}
    return Bench(lambda: session.run(None, feeds), "thread_time_ns", {})


def _torch_bench(c_in: int, c_out: int, hw: int, device: str) -> Bench:
    conv = torch.nn.Conv2d(c_in, c_out, 3, padding=1).to(device).eval()
    x = torch.randn(1 if device == "cpu" else 32, c_in, hw, hw, device=device)

    def step() -> None:
        with torch.inference_mode():
            torch.relu(conv(x))

    if device == "cuda":
        return Bench(step, "cuda-events", {}, cuda_stream=torch.cuda.current_stream())
    return Bench(step, "thread_time_ns", {})


# backend -> (bench factory (c_in, c_out) -> Bench, reference width, candidates, spatial size, ISA decides?)
_PLANS: dict[str, tuple[Callable[[int, int, int], Bench], int, tuple[int, ...], int, bool]] = {
    "onnxruntime": (_ort_bench, 64, (8, 16, 32), 28, True),
    "torch": (lambda i, o, hw: _torch_bench(i, o, hw, "cpu"), 64, (8, 16, 32), 28, True),
    "torch-cuda": (lambda i, o, hw: _torch_bench(i, o, hw, "cuda"), 256, (8, 16, 32, 64, 128), 28, False),
}
_PLANS["tensorrt"] = _PLANS["torch-cuda"]  # same GPU, same tensor-core tiles: measured through cuDNN


@functools.lru_cache(maxsize=None)
def detect_multiple(backend: str, measure: bool = True, rounds: int = 5, repeats: int = 10) -> ChannelMultiple:
    """The channel multiple of ``backend`` on this machine (cached per process). ``measure=False``
    returns the instruction-set guess alone (CPU backends; GPU backends always measure)."""
    factory, ref, candidates, hw, isa_decides = _PLANS[backend]
    isa = cpu_isa() if isa_decides else "cuda"
    guess = ISA_MULTIPLE[isa] if isa_decides else None
    device = torch.cuda.get_device_name() if not isa_decides else cpu_name()
    if not measure and guess is not None:
        return ChannelMultiple(guess, backend, "isa", isa, guess, ref, {}, device)
    widths = [ref] + [ref - m // 2 for m in candidates]
    with torch_threads(1):
        benches = {w: factory(ref, w, hw) for w in widths}
        try:
            ratios = _interleaved_ratios(benches, ref, rounds, repeats)
        finally:
            for b in benches.values():
                b.close()
    return ChannelMultiple(pick(ratios, ref, candidates), backend, "measured", isa, guess, ref,
                           {int(w): round(r, 4) for w, r in sorted(ratios.items())}, device)
