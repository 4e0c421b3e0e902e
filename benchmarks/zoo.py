"""How much of the torchvision zoo does the compiler spine handle, and how fast?

For every torchvision classification model (or the ones named), this builds it with
``weights=None`` (BatchNorm statistics calibrated on one batch made of the example input and 3
random images, so that activations keep a normal scale instead of decaying into denormals or
blowing up), then measures:

* traced? (or the TraceError), trace time (symbolic trace + one shape-propagation run);
* number of channel groups, prunable groups, prunable channel %; analysis time;
* finalize time for random gates (half of every prunable group at exactly 0; the time covers
  gate insertion and finalize with its built-in equivalence check) and the relative output
  difference ``max|fin - gated| / max|gated|`` on the traced input; parameters after;
* after a float32 EquivalenceError: the gated model's own float32-vs-float64 difference and the
  finalize difference when everything runs in float64 (randomly initialised deep nets with random
  gates can amplify rounding beyond the 1e-4 check: efficientnet_b2..b6);
* one forward pass of the dense model at the same input (median of 3 after a warm-up), so
  that the analysis time can be read in forward passes.

    python benchmarks/zoo.py --quick                  # the default test-suite list (14 models)
    python benchmarks/zoo.py --models resnet18,vgg11  # chosen models
    python benchmarks/zoo.py                          # every classification model (long)

Results go to benchmarks/results/zoo.{json,md} (``--out`` changes the stem), rewritten after
every model so that an interrupted run keeps what it measured.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import json
import platform
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torchvision

import fxprune
from fxprune.models import calibrate_batchnorm
from fxprune.passes import FinalizeReport, finalize, insert_gates

RESULTS = Path(__file__).resolve().parent / "results"
QUICK = [
    "resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "densenet121",
    "efficientnet_b0", "convnext_tiny", "shufflenet_v2_x1_0", "regnet_y_400mf", "squeezenet1_1",
    "googlenet", "vgg11_bn", "mnasnet0_5", "deeplabv3_mobilenet_v3_large",
]
SEGMENTATION = set(torchvision.models.list_models(module=torchvision.models.segmentation))
NEEDS_224 = ("vit_", "swin_", "maxvit_")
HUGE = {  # skipped unless --include-huge: several deep copies of these exceed a small machine
    "vit_h_14": "632M parameters", "regnet_y_128gf": "644M parameters",
    "vit_l_16": "304M parameters", "vit_l_32": "306M parameters",
}


def input_size(name: str, requested: int) -> int:
    if name.startswith(NEEDS_224):
        return 224
    if name == "inception_v3":
        return max(requested, 75)
    return requested


def build(name: str, size: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name in SEGMENTATION:
        model = torchvision.models.get_model(name, weights=None, weights_backbone=None)
    else:
        model = torchvision.models.get_model(name, weights=None)
    model.eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    # statistics of the example input and 3 random images: few-sample statistics of deep 2x2 maps
    # otherwise make some models (efficientnet_b3..b6 at 64x64) numerically chaotic in float32
    noise = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(3))
    calibrate_batchnorm(model, torch.cat([x, noise]))
    return model, x


def leaves(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in leaves(v)]
    return []


def rel_diff(a: Any, b: Any) -> float:
    worst = 0.0
    for x, y in zip(leaves(a), leaves(b)):
        d = (x.double() - y.double()).abs().max().item()
        worst = max(worst, d / max(y.double().abs().max().item(), 1e-12))
    return worst


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for n, p in m.named_parameters() if "fxprune_gates" not in n)


def forward_time(model: nn.Module, x: torch.Tensor, repeats: int = 3) -> float:
    with torch.no_grad():
        model(x)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def half_gates(gates: dict, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for gid in sorted(gates):
        w = gates[gid].weight
        v = rng.uniform(0.25, 1.75, w.numel())
        v[rng.permutation(w.numel())[: w.numel() // 2]] = 0.0
        with torch.no_grad():
            w.copy_(torch.as_tensor(v, dtype=w.dtype))


def short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text.splitlines()[0][:400]


def measure(name: str, size: int) -> dict[str, Any]:
    size = input_size(name, size)
    row: dict[str, Any] = {"model": name, "input": [1, 3, size, size]}
    model, x = build(name, size)
    row["params"] = n_params(model)
    row["forward_s"] = forward_time(model, x)
    t = time.perf_counter()
    try:
        gm = fxprune.trace(model, (x,))
    except fxprune.TraceError as exc:
        row.update(traced=False, error=short(exc), trace_s=time.perf_counter() - t)
        return row
    row.update(traced=True, trace_s=time.perf_counter() - t,
               leaf_modules=sorted(gm.meta.get("fxprune_leaf_modules", {})))
    t = time.perf_counter()
    cg = fxprune.analyze(gm)
    row["analyze_s"] = time.perf_counter() - t
    s = cg.summary()
    row.update(groups=s["groups"], prunable_groups=s["prunable_groups"], channels=s["channels"],
               prunable_channels=s["prunable_channels"],
               prunable_channel_pct=100.0 * s["prunable_fraction"],
               analyze_per_forward=row["analyze_s"] / row["forward_s"])
    if not cg.prunable_groups:
        return row
    t = time.perf_counter()
    try:
        gated, gates = insert_gates(gm, cg)
        half_gates(gates)
        rep = FinalizeReport()
        fin = finalize(gated, cg, report=rep)
    except fxprune.EquivalenceError as exc:
        row.update(finalize_s=time.perf_counter() - t, finalize_error=short(exc))
        row.update(float64_check(model, x, gated))
        return row
    except Exception as exc:  # noqa: BLE001 - a benchmark records failures and goes on
        row.update(finalize_s=time.perf_counter() - t, finalize_error=short(exc))
        return row
    row["finalize_s"] = time.perf_counter() - t
    with torch.no_grad():
        row["rel_diff"] = rel_diff(fin(x), gated(x))
    row.update(report_rel_diff=rep.max_rel_diff, params_after=n_params(fin),
               removed_branches=len(rep.removed_branches), retained_groups=len(rep.retained))
    return row


def float64_check(model: nn.Module, x: torch.Tensor, gated: nn.Module) -> dict[str, float]:
    """After a float32 EquivalenceError: how far the float32 gated model is from its own float64
    twin (its conditioning), and the finalize difference when the whole pipeline runs in float64.
    Randomly initialised deep nets with random gates can amplify float32 rounding beyond 1e-4."""
    with torch.no_grad():
        noise = rel_diff(gated(x), copy.deepcopy(gated).double()(x.double()))
    model64, x64 = copy.deepcopy(model).double(), x.double()
    gm = fxprune.trace(model64, (x64,))
    cg = fxprune.analyze(gm)
    gated64, gates = insert_gates(gm, cg)
    half_gates(gates)
    fin = finalize(gated64, cg, check=False)
    with torch.no_grad():
        return {"fp32_noise": noise, "rel_diff_fp64": rel_diff(fin(x64), gated64(x64))}


def machine() -> dict[str, Any]:
    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
    }


def fmt(v: Any, spec: str) -> str:
    return "" if v is None else format(v, spec)


def markdown(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    lines = [
        "# fxprune on the torchvision zoo",
        "",
        f"{info['date']}, torch {info['torch']}, torchvision {info['torchvision']}, "
        f"{info['threads']} threads on {info['processor']}. Random gates: half of every prunable "
        "group at 0. Times in seconds; `an/fwd` = analysis time in dense forward passes; "
        "`rel diff` = max|finalized - gated| / max|gated|.",
        "",
        "| model | input | traced | groups | prunable | prunable ch % | trace | analyze | finalize "
        "| forward | an/fwd | rel diff | params M before → after | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        note = r.get("error") or r.get("finalize_error") or ""
        if "rel_diff_fp64" in r:
            note = (f"float32: {note.split(';')[0]}; but the float32 gated model is itself "
                    f"{r['fp32_noise']:.1e} from its float64 twin, and in float64 finalize matches "
                    f"to {r['rel_diff_fp64']:.1e}")
        if r.get("leaf_modules"):
            note = f"leaves: {', '.join(r['leaf_modules'])}. " + note
        after = r.get("params_after")
        params = f"{r['params'] / 1e6:.2f}" + (f" → {after / 1e6:.2f}" if after is not None else "")
        lines.append(
            f"| {r['model']} | {r['input'][2]} | {'yes' if r.get('traced') else 'no'} "
            f"| {fmt(r.get('groups'), 'd')} | {fmt(r.get('prunable_groups'), 'd')} "
            f"| {fmt(r.get('prunable_channel_pct'), '.1f')} | {fmt(r.get('trace_s'), '.2f')} "
            f"| {fmt(r.get('analyze_s'), '.3f')} | {fmt(r.get('finalize_s'), '.2f')} "
            f"| {fmt(r.get('forward_s'), '.3f')} | {fmt(r.get('analyze_per_forward'), '.2f')} "
            f"| {fmt(r.get('rel_diff'), '.1e')} | {params} | {note.replace('|', '/')} |"
        )
    ok = [r for r in rows if "rel_diff" in r]
    lines += ["", f"{len(rows)} models: {sum(bool(r.get('traced')) for r in rows)} traced, "
              f"{len(ok)} finalized equivalently (max rel diff "
              f"{max((r['rel_diff'] for r in ok), default=0):.1e}), "
              f"{sum('finalize_error' in r for r in rows)} finalize errors "
              f"({sum('rel_diff_fp64' in r for r in rows)} of them float32 noise of an ill-conditioned "
              "random model: exact in float64)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", help="comma-separated model names (torchvision classification or segmentation)")
    ap.add_argument("--quick", action="store_true", help="the default test-suite list")
    ap.add_argument("--size", type=int, default=224, help="input height/width (default 224)")
    ap.add_argument("--include-huge", action="store_true", help=f"also run {sorted(HUGE)}")
    ap.add_argument("--out", default="zoo", help="result file stem in benchmarks/results/")
    args = ap.parse_args()
    if args.models:
        names = [n.strip() for n in args.models.split(",") if n.strip()]
    elif args.quick:
        names = QUICK
    else:
        names = torchvision.models.list_models(module=torchvision.models)
        if not args.include_huge:
            names = [n for n in names if n not in HUGE]
    info = machine()
    config = {"models": names, "size": args.size, "gating": "uniform [0.25, 1.75), half of each group 0, seed 0"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for name in names:
        try:
            row = measure(name, args.size)
        except Exception as exc:  # noqa: BLE001 - e.g. an analysis crash: record it and go on
            row = {"model": name, "input": [1, 3, args.size, args.size], "params": 0,
                   "error": short(exc), "traceback": traceback.format_exc(limit=5)}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
        (RESULTS / f"{args.out}.json").write_text(json.dumps({"machine": info, "config": config, "results": rows}, indent=1))
        (RESULTS / f"{args.out}.md").write_text(markdown(rows, info))
        gc.collect()
    print(markdown(rows, info))


if __name__ == "__main__":
    main()
