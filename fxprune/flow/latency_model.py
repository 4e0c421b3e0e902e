"""Build, cache and check LPNet latency predictors on a real backend (``fxprune latency-model``).

``build_latency_model`` samples width configurations of the prunable groups (uniform scalings and
random per-group widths, always at the backend's channel multiple), builds each sub-network with
finalize (no training: latency does not depend on the weights), measures it on the backend
against the dense model in interleaved rounds (so machine drift cancels in the ratio), fits
``fxprune.lpnet.LatencyPredictor`` on all but ``holdout`` of them and reports its mean absolute
percentage error on those. The per-layer lookup table, the usual alternative, is measured on the
same held-out configurations for comparison (``lookup_table=True``): every conv/linear layer
timed alone at its widths, summed, plus the dense model's non-layer time.

Predictors are cached on disk, keyed by the graph's fingerprint, the backend, the machine (CPU or
GPU name, instruction set, library versions) and the sampling settings, so a budget on the same
model and machine reuses one: ``$FXPRUNE_CACHE`` (default ``~/.cache/fxprune``) ``/latency/``.
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.fx as fx
from tqdm.auto import tqdm

import fxprune
from fxprune.backends.hardware import cpu_isa
from fxprune.backends.registry import require_backend
from fxprune.backends.runners import Bench, RunSpec, cpu_name, torch_threads, versions
from fxprune.cost import CostModel
from fxprune.decision import Decision
from fxprune.errors import FxpruneWarning
from fxprune.files import atomic_path
from fxprune.ir import ChannelGraph
from fxprune.lpnet import LatencyPredictor, encode_counts
from fxprune.passes.finalize import finalize as finalize_pass

FORMAT = "fxprune-lpnet/1"


def cache_dir() -> Path:
    """Where predictors are kept: ``$FXPRUNE_CACHE/latency`` (default ``~/.cache/fxprune``)."""
    root = os.environ.get("FXPRUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fxprune")
    return Path(root) / "latency"


@dataclass
class LatencyModel:
    """A fitted predictor and how well it predicts: ``test_mape`` on held-out configurations
    (percent), ``lut_mape`` the lookup table's on the same ones, ``samples`` every measurement."""

    predictor: LatencyPredictor
    backend: str
    multiple: int
    train_mape: float
    test_mape: float
    lut_mape: float | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    cache_path: str | None = None
    cached: bool = False

    def summary(self) -> str:
        lut = "" if self.lut_mape is None else f", per-layer lookup table {self.lut_mape:.2f}%"
        held = sum(s["split"] == "test" for s in self.samples)
        return (f"latency model on {self.backend} (channel multiple {self.multiple}): dense "
                f"{self.predictor.dense_ms:.3f} ms; mean abs. error {self.test_mape:.2f}% on {held} held-out widths "
                f"(fit {self.train_mape:.2f}%){lut}" + (" [cached]" if self.cached else ""))

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "predictor"}
        d["dense_ms"], d["meta"] = self.predictor.dense_ms, self.predictor.meta
        return d


def sample_counts(cg: ChannelGraph, n: int, multiple: int, seed: int = 0) -> list[dict[int, int]]:
    """``n`` width configurations: a quarter uniform scalings from 20% to 100%, the rest random
    per-group fractions in [15%, 100%]; every width a multiple of ``multiple`` (or the group's
    own size, for groups smaller than it). Deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    groups = cg.prunable_groups
    n_uniform = max(n // 4, 1)

    def snap(size: int, f: float) -> int:
        m = min(multiple, size)
        return int(min(size, max(m, round(f * size / m) * m)))

    out = [{g.id: snap(g.size, f) for g in groups} for f in np.linspace(0.2, 1.0, n_uniform)]
    while len(out) < n:
        out.append({g.id: snap(g.size, float(rng.uniform(0.15, 1.0))) for g in groups})
    return out


def build(gm: fx.GraphModule, cg: ChannelGraph, counts: dict[int, int]) -> fx.GraphModule:
    """The sub-network keeping the first ``counts[g]`` units of each group (which units does not
    change latency), finalized without its equivalence check: it is only timed."""
    keep = {}
    for gid, k in counts.items():
        mask = np.zeros(cg.group(gid).size, dtype=bool)
        mask[:k] = True
        keep[gid] = mask
    return finalize_pass(gm, cg, Decision(keep), check=False).eval()


def _median_ratios(benches: Sequence[Bench], anchor: Bench, rounds: int, repeats: int) -> list[float]:
    """Latency of each bench over the anchor's, per round the ratio of medians, median over rounds."""
    for b in (anchor, *benches):
        b.run(2)
    per: list[list[float]] = [[] for _ in benches]
    for _ in range(rounds):
        base = statistics.median(anchor.run(repeats))
        for i, b in enumerate(benches):
            per[i].append(statistics.median(b.run(repeats)) / base)
    return [float(statistics.median(r)) for r in per]


def measure_ratios(dense: torch.nn.Module, make: Any, n: int, backend: str, spec: RunSpec, rounds: int = 3,
                   repeats: int = 5, chunk: int = 8, progress: bool = True, desc: str = "measure") -> tuple[list[float], float]:
    """Latency of ``make(i)`` for i < n relative to ``dense``, measured in chunks that each
    interleave with the dense model; and the dense model's median milliseconds."""
    record = require_backend(backend)
    with torch_threads(spec.threads if record.device == "cpu" else 0):
        anchor = record.runner(dense, spec, backend)
        try:
            anchor.run(3)
            dense_ms = float(statistics.median(anchor.run(max(repeats * 3, 10))))
            ratios: list[float] = []
            bar = tqdm(total=n, desc=desc, disable=not progress, leave=False)
            for start in range(0, n, chunk):
                benches = [record.runner(make(i), spec, backend) for i in range(start, min(n, start + chunk))]
                try:
                    ratios += _median_ratios(benches, anchor, rounds, repeats)
                finally:
                    for b in benches:
                        b.close()
                bar.update(len(benches))
            bar.close()
        finally:
            anchor.close()
    return ratios, dense_ms


def _cache_key(gm: fx.GraphModule, cg: ChannelGraph, backend: str, spec: RunSpec, settings: dict[str, Any]) -> str:
    record = require_backend(backend)
    machine = torch.cuda.get_device_name() if record.device == "cuda" else f"{cpu_name()}/{cpu_isa()}"
    key = {"format": FORMAT, "graph": cg.fingerprint(gm), "backend": backend, "machine": machine,
           "versions": versions(), "threads": spec.threads, "batch": spec.batch_size, **settings}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def build_latency_model(gm: fx.GraphModule, cg: ChannelGraph, backend: str = "onnxruntime", *,
                        samples: int = 80, holdout: int = 20, multiple: int | None = None, seed: int = 0,
                        threads: int = 1, batch_size: int = 1, rounds: int = 3, repeats: int = 5,
                        lookup_table: bool = False, cache: bool = True, progress: bool = True) -> LatencyModel:
    """A latency predictor for ``gm`` (traced) on ``backend``, from the cache or measured now.

    ``multiple``: the width step of the samples (default: the backend's detected multiple).
    Raises ``ConfigError`` (unknown backend, too few samples), ``BackendUnavailable``.
    """
    record = require_backend(backend)
    if holdout < 1 or samples - holdout < 4:
        raise fxprune.ConfigError(f"latency model: need holdout >= 1 and at least 4 fitting samples, got "
                                  f"samples={samples}, holdout={holdout}")
    if not cg.prunable_groups:
        raise fxprune.ConfigError("latency model: the model has no prunable channel group, so no width to vary")
    multiple = multiple or record.multiple().value
    spec = RunSpec(example_inputs=tuple(t[:1] for t in gm.meta["fxprune_example_inputs"]), batch_size=batch_size,
                   threads=threads)
    settings = {"samples": samples, "holdout": holdout, "multiple": multiple, "seed": seed, "rounds": rounds,
                "repeats": repeats}
    path = cache_dir() / f"{_cache_key(gm, cg, backend, spec, settings)}.pt"
    state = _load_cached(path) if cache else None
    if state is not None:
        if state.get("format") == FORMAT and (state.get("lookup_table") or not lookup_table):
            model = LatencyModel(LatencyPredictor.from_state_dict(state["predictor"]), **state["model"])
            model.cached, model.cache_path = True, str(path)
            return model
    t0 = time.perf_counter()
    counts = sample_counts(cg, samples, multiple, seed)
    order = np.random.default_rng(seed + 1).permutation(len(counts))
    test = set(order[:holdout].tolist()) if holdout else set()
    ratios, dense_ms = measure_ratios(gm, lambda i: build(gm, cg, counts[i]), len(counts), backend, spec, rounds,
                                      repeats, progress=progress, desc=f"latency samples ({backend})")
    groups = [g.id for g in cg.prunable_groups]
    sizes = [g.size for g in cg.prunable_groups]
    enc = np.stack([encode_counts(groups, sizes, c) for c in counts])
    y = np.asarray(ratios)
    fit_idx = np.array([i for i in range(len(counts)) if i not in test])
    test_idx = np.array(sorted(test))
    meta = {"backend": backend, "device": record.device, "multiple": multiple, "threads": threads,
            "batch_size": batch_size, "fingerprint": cg.fingerprint(gm), **versions()}
    predictor = LatencyPredictor(groups, sizes, dense_ms, meta=meta)
    train_mape = predictor.fit(enc[fit_idx], y[fit_idx], seed=seed)
    test_mape = predictor.mape(enc[test_idx], y[test_idx])
    with torch.no_grad():
        pred = predictor.ratio(torch.as_tensor(enc)).numpy()
    rows = [{"counts": {int(k): int(v) for k, v in c.items()}, "measured": float(y[i]), "predicted": float(pred[i]),
             "split": "test" if i in test else "fit"} for i, c in enumerate(counts)]
    lut_mape = None
    if lookup_table:
        lut = LayerTable(gm, cg, backend, spec, rounds=rounds, repeats=repeats)
        lut_ratios = lut.predict_ratios([counts[i] for i in test_idx], dense_ms, progress=progress)
        for i, r in zip(test_idx, lut_ratios):
            rows[i]["lookup_table"] = float(r)
        lut_mape = float(np.mean(np.abs(np.asarray(lut_ratios) - y[test_idx]) / y[test_idx]) * 100)
    model = LatencyModel(predictor, backend, multiple, train_mape, test_mape, lut_mape, rows,
                         time.perf_counter() - t0)
    if cache:
        state = {"format": FORMAT, "lookup_table": lookup_table, "predictor": predictor.state_dict(),
                 "model": {k: v for k, v in asdict(model).items() if k not in ("predictor", "cached", "cache_path")}}
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        model.cache_path = str(path)
    return model


def _load_cached(path: Path) -> dict[str, Any] | None:
    """A cached predictor's state, or None (absent; unreadable files are measured again, with a warning)."""
    if not path.exists():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file must not stop a run
        warnings.warn(f"ignoring the unreadable latency-model cache {path} ({type(err).__name__}: {err}); "
                      "measuring again", FxpruneWarning, stacklevel=3)
        return None


class LayerTable:
    """The per-layer lookup table: each conv/linear layer of the graph timed alone on the backend
    at the widths a configuration gives it (memoised), summed, plus the dense model's time
    outside those layers (measured dense total minus the table's dense sum)."""

    def __init__(self, gm: fx.GraphModule, cg: ChannelGraph, backend: str, spec: RunSpec, rounds: int = 3,
                 repeats: int = 5) -> None:
        self.gm, self.cg, self.backend, self.spec = gm, cg, backend, spec
        self.rounds, self.repeats = rounds, repeats
        self.cost = CostModel(gm, cg)
        nodes = {n.name: n for n in gm.graph.nodes}
        self.shapes = []  # (kind, in_channels, out_channels, kernel, stride, padding, dilation, groups, input HxW)
        for layer in cg.layers:
            mod = gm.get_submodule(layer.module_path) if layer.module_path else None
            x = nodes[layer.node].args[0].meta["fxprune_value"]
            spatial = tuple(x.shape[2:]) if layer.kind != "linear" else ()
            if isinstance(mod, torch.nn.Conv2d):
                self.shapes.append(("conv", mod.kernel_size, mod.stride, mod.padding, mod.dilation, spatial))
            else:  # linear, or a conv kind the table does not time alone: a 1x1 conv on its positions
                self.shapes.append(("linear", (1, 1), (1, 1), (0, 0), (1, 1), (1, int(np.prod(spatial or (1,))))))
        self.times: dict[tuple, float] = {}

    def _keys(self, counts: dict[int, int]) -> list[tuple]:
        """(layer index, kept inputs, kept outputs, groups) per layer: what the table is keyed by."""
        keep = {}
        for gid, k in counts.items():
            m = np.zeros(self.cg.group(gid).size, dtype=bool)
            m[:k] = True
            keep[gid] = m
        keys = []
        for i, (layer, (c_in, c_out)) in enumerate(zip(self.cg.layers, self.cost.layer_widths(keep))):
            groups = layer.groups
            if groups > 1 and c_in == groups:  # depthwise: its groups follow the kept width
                c_in = groups = c_out
            keys.append((i, c_in, c_out, groups))
        return keys

    def _module(self, key: tuple) -> torch.nn.Module:
        i, c_in, c_out, groups = key
        _, k, s, p, d, hw = self.shapes[i]
        return torch.nn.Conv2d(c_in, c_out, k, s, p, d, groups=groups).eval()

    def _input(self, key: tuple) -> tuple[torch.Tensor, ...]:
        i, c_in, _, _ = key
        hw = self.shapes[i][5]
        return (torch.randn(1, c_in, *hw),)

    def predict_ratios(self, configs: Sequence[dict[int, int]], dense_ms: float, progress: bool = True) -> list[float]:
        dense_keys = self._keys({g.id: g.size for g in self.cg.prunable_groups})
        keys = [self._keys(c) for c in configs]
        todo = sorted({k for ks in [dense_keys, *keys] for k in ks} - set(self.times))
        record = require_backend(self.backend)
        bar = tqdm(todo, desc="lookup table layers", disable=not progress, leave=False)
        with torch_threads(self.spec.threads if record.device == "cpu" else 0):
            for key in bar:
                spec = RunSpec(example_inputs=self._input(key), threads=self.spec.threads)
                bench = record.runner(self._module(key), spec, self.backend)
                try:
                    bench.run(2)
                    self.times[key] = float(statistics.median(bench.run(self.rounds * self.repeats)))
                finally:
                    bench.close()
        overhead = dense_ms - sum(self.times[k] for k in dense_keys)
        return [(sum(self.times[k] for k in ks) + overhead) / dense_ms for ks in keys]
