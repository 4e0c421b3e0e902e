"""Does halving FLOPs halve latency? Prune to 50% FLOPs (L1, no training) and measure.

For torchvision resnet50, mobilenet_v2, densenet121 (3x224x224) and the project's
CIFAR ResNet-20 (3x32x32), this prints and saves, per batch size: the FLOPs reduction
factor, the measured speedup (interleaved rounds, median of per-round ratios) and the
realised fraction = speedup / FLOPs factor.

    python benchmarks/latency.py                      # ONNX Runtime, CPU, 1 thread, batch 1 and 16
    python benchmarks/latency.py --quick              # fewer rounds/repeats: a smoke run
    python benchmarks/latency.py --backend torch-cuda # eager and torch.compile, batch 1 and 64

Results go to benchmarks/results/<stem>.{json,md} with machine info.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torchvision
from tqdm import tqdm

import fxprune
from fxprune.backends import compare_latency, export
from fxprune.backends.latency import cpu_name, require_cuda
from fxprune.models import build_model

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {  # name -> (builder, per-sample input shape)
    "resnet50": (lambda: torchvision.models.resnet50(weights=None), (3, 224, 224)),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(weights=None), (3, 224, 224)),
    "densenet121": (lambda: torchvision.models.densenet121(weights=None), (3, 224, 224)),
    "resnet20": (lambda: build_model("resnet20", num_classes=10), (3, 32, 32)),
}


def machine_info(backend: str) -> dict[str, Any]:
    """What the numbers depend on: CPU/GPU model and library versions."""
    import onnx
    import onnxruntime

    info = {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    if backend == "torch-cuda":
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    return info


def flops_of(report: dict[str, Any]) -> tuple[float, float]:
    """Dense and pruned FLOPs from `result.report.to_dict()`."""
    if isinstance(report.get("dense"), dict) and isinstance(report.get("pruned"), dict):
        return float(report["dense"]["flops"]), float(report["pruned"]["flops"])
    if isinstance(report.get("flops"), dict):
        return float(report["flops"]["dense"]), float(report["flops"]["pruned"])
    return float(report["dense_flops"]), float(report["pruned_flops"])


def prune(name: str) -> tuple[torch.nn.Module, torch.nn.Module, tuple[int, ...], float, float]:
    """Dense model, its L1-pruned version at 50% FLOPs, the input shape and both FLOPs."""
    build, shape = MODELS[name]
    torch.manual_seed(0)
    dense = build().eval()
    x = torch.randn(1, *shape)
    result = fxprune.compile(dense, method="l1", budget=fxprune.Budget(flops=0.5),
                             example_inputs=(x,))
    dense_flops, pruned_flops = flops_of(result.report.to_dict())
    return dense, result.model.eval(), shape, dense_flops, pruned_flops


def run_cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per (model, batch, mode)."""
    rows = []
    modes = ["eager", "compile"] if args.backend == "torch-cuda" else ["ort"]
    batches = args.batch_sizes or ([1, 64] if args.backend == "torch-cuda" else [1, 16])
    timing = dict(rounds=args.rounds, warmup=args.warmup, repeats=args.repeats)
    with tempfile.TemporaryDirectory(prefix="fxprune-bench-") as tmp:
        for name in tqdm(args.models, desc="models"):
            dense, pruned, shape, f_dense, f_pruned = prune(name)
            x = (torch.randn(1, *shape),)
            if args.backend == "onnxruntime":  # export once, validated; time the files
                a, b = Path(tmp) / f"{name}_dense.onnx", Path(tmp) / f"{name}_pruned.onnx"
                export(dense, a, example_inputs=x)
                export(pruned, b, example_inputs=x)
                subjects = (str(a), str(b))
            else:
                subjects = (dense, pruned)
            for mode in modes:
                for batch in batches:
                    cmp = compare_latency(*subjects, backend=args.backend, input_shape=shape,
                                          batch_size=batch, threads=args.threads,
                                          compile=mode == "compile", **timing)
                    factor = f_dense / f_pruned
                    rows.append({
                        "model": name, "input": list(shape), "batch": batch, "mode": mode,
                        "dense_flops": f_dense, "pruned_flops": f_pruned, "flops_factor": factor,
                        "dense_ms": cmp.dense.median_ms, "pruned_ms": cmp.pruned.median_ms,
                        "speedup": cmp.speedup, "speedup_min": cmp.speedup_min,
                        "speedup_max": cmp.speedup_max, "realised": cmp.speedup / factor,
                        "comparison": cmp.to_dict()})
                    tqdm.write(f"{name:13s} {mode:8s} b{batch:<3d} speedup {cmp.speedup:.2f}x "
                               f"(FLOPs {factor:.2f}x)")
    return rows


def markdown(rows: list[dict[str, Any]], info: dict[str, Any], args: argparse.Namespace) -> str:
    """Results table plus the conditions it was measured under."""
    device = info.get("gpu", info["cpu"])
    head = [f"# Latency of 50%-FLOPs L1-pruned models ({args.backend})", "",
            f"Device: {device}; threads: {args.threads}; torch {info['torch']}, "
            f"onnxruntime {info['onnxruntime']}; {info['date']}"
            + (" — **quick run**" if args.quick else ""),
            f"Rounds {args.rounds} × {args.repeats} timed runs per model (warm-up {args.warmup}); "
            "speedup = median of per-round dense/pruned median ratios [min–max].", "",
            "| model | input | batch | mode | GFLOPs dense → pruned | FLOPs factor | dense ms "
            "| pruned ms | speedup [min–max] | realised |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    lines = [f"| {r['model']} | {'x'.join(map(str, r['input']))} | {r['batch']} | {r['mode']} | "
             f"{r['dense_flops'] / 1e9:.3f} → {r['pruned_flops'] / 1e9:.3f} | "
             f"{r['flops_factor']:.2f}× | {r['dense_ms']:.2f} | {r['pruned_ms']:.2f} | "
             f"{r['speedup']:.2f}× [{r['speedup_min']:.2f}–{r['speedup_max']:.2f}] | "
             f"{r['realised']:.0%} |" for r in rows]
    return "\n".join(head + lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=["onnxruntime", "torch-cuda"], default="onnxruntime")
    p.add_argument("--quick", action="store_true", help="3 rounds x 3 repeats: a smoke run")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                   help="default: 1 16 (onnxruntime), 1 64 (torch-cuda)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--out-stem", default=None,
                   help="file stem under benchmarks/results (default: latency, latency_cuda, +_quick)")
    args = p.parse_args(argv)
    gpu = args.backend == "torch-cuda"
    defaults = (3, 3, 1) if args.quick else ((7, 20, 10) if gpu else (5, 10, 3))
    args.rounds = args.rounds or defaults[0]
    args.repeats = args.repeats or defaults[1]
    args.warmup = args.warmup if args.warmup is not None else defaults[2]
    if args.out_stem is None:
        args.out_stem = "latency" + ("_cuda" if gpu else "") + ("_quick" if args.quick else "")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.backend == "torch-cuda":
        require_cuda(args.backend)  # fail before pruning anything
    info = machine_info(args.backend)
    rows = run_cases(args)
    md = markdown(rows, info, args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"machine": info, "backend": args.backend, "quick": args.quick,
               "threads": args.threads, "rounds": args.rounds, "repeats": args.repeats,
               "warmup": args.warmup, "method": "l1", "budget": {"flops": 0.5}, "results": rows}
    (RESULTS / f"{args.out_stem}.json").write_text(json.dumps(payload, indent=2))
    (RESULTS / f"{args.out_stem}.md").write_text(md)
    print(md)
    print(f"saved {RESULTS / args.out_stem}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
