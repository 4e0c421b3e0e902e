"""Dense vs l1 vs gdp on the bundled digits with the CIFAR-style ResNet-20, equal total epochs.

Every run sees the same data split and batch order; ``--seeds`` vary the initial weights. All
runs train for the same total number of epochs:
- dense: ``epochs + finetune`` epochs of ordinary training;
- l1:    ``epochs`` of ordinary training, L1 allocation to the budget, ``finetune`` epochs;
- gdp:   ``epochs`` with gates and the FLOPs penalty, finalize (no fine-tune needed for
         equivalence), then ``finetune`` epochs.
Per run: test accuracy (before and after fine-tuning), achieved MACs and parameters counted on
the finalized module, and wall time.

    python benchmarks/methods.py                 # 50% and 25% FLOPs, 8 + 4 epochs, 2 seeds
    python benchmarks/methods.py --quick         # 1 + 1 epochs, 1 seed: a smoke run

Results go to benchmarks/results/methods.{json,md} (``--quick``: methods_quick.*).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import fxprune
from fxprune.cost import count_macs
from fxprune.data import DataSplit, digits_loaders
from fxprune.models import build_model
from fxprune.train import evaluate, train

RESULTS = Path(__file__).resolve().parent / "results"


def run_dense(data: DataSplit, model_name: str, epochs: int, seed: int, lr: float) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = build_model(model_name, num_classes=data.num_classes)
    t = time.perf_counter()
    train(model, data.train, epochs, lr=lr, progress=False, desc="dense")
    seconds = time.perf_counter() - t
    macs = count_macs(model, data.example_inputs())
    return {"method": "dense", "flops_target": 1.0, "accuracy": evaluate(model, data.test), "accuracy_before_finetune": None,
            "macs": macs, "macs_fraction": 1.0, "params": sum(p.numel() for p in model.parameters()),
            "seconds": seconds}


def run_method(data: DataSplit, model_name: str, method: str, flops: float, epochs: int, finetune: int,
               seed: int, lr: float) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = build_model(model_name, num_classes=data.num_classes)
    t = time.perf_counter()
    result = fxprune.compile(model, method, fxprune.Budget(flops=flops), data.example_inputs(),
                             train_loader=data.train, eval_loader=data.test, epochs=epochs,
                             finetune_epochs=finetune, lr=lr, progress=False)
    seconds = time.perf_counter() - t
    r = result.report
    acc = r.accuracy
    return {"method": method, "flops_target": flops, "accuracy": acc.get("finetuned", acc["pruned"]),
            "accuracy_before_finetune": acc["pruned"], "accuracy_gated": acc.get("gated"),
            "macs": r.pruned["flops"], "macs_fraction": r.pruned["flops"] / r.dense["flops"],
            "params": r.pruned["params"], "seconds": seconds, "method_options": r.method_options,
            "max_rel_diff": r.equivalence["max_rel_diff"]}


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, target): mean and spread over seeds."""
    rows: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for run in runs:
        rows.setdefault((run["method"], run["flops_target"]), []).append(run)
    out = []
    for (method, target), rs in rows.items():
        accs = [r["accuracy"] for r in rs]
        before = [r["accuracy_before_finetune"] for r in rs if r["accuracy_before_finetune"] is not None]
        out.append({"method": method, "flops_target": target, "seeds": len(rs),
                    "accuracy_mean": statistics.fmean(accs), "accuracy_min": min(accs), "accuracy_max": max(accs),
                    "accuracy_before_finetune_mean": statistics.fmean(before) if before else None,
                    "macs_fraction_mean": statistics.fmean(r["macs_fraction"] for r in rs),
                    "macs_fraction_max": max(r["macs_fraction"] for r in rs),
                    "params_mean": statistics.fmean(r["params"] for r in rs),
                    "seconds_mean": statistics.fmean(r["seconds"] for r in rs)})
    return out


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    dense = next(r for r in rows if r["method"] == "dense")
    lines = [f"# Methods on digits ({meta['model']}, {meta['epochs']} + {meta['finetune']} epochs, "
             f"seeds {meta['seeds']})", "",
             f"{meta['train_size']} train / {meta['test_size']} test images, 3x{meta['image_size']}x"
             f"{meta['image_size']}; torch {meta['torch']}, {meta['date']}. Accuracy is the mean over seeds "
             "(min-max in brackets); MACs are counted on the finalized module.", "",
             "| method | FLOPs target | accuracy | vs dense | before fine-tune | MACs (% dense, worst seed) | params | time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        before = "" if r["accuracy_before_finetune_mean"] is None else f"{r['accuracy_before_finetune_mean']:.4f}"
        lines.append(
            f"| {r['method']} | {r['flops_target']:.0%} | {r['accuracy_mean']:.4f} ({r['accuracy_min']:.4f}-"
            f"{r['accuracy_max']:.4f}) | {100 * (r['accuracy_mean'] - dense['accuracy_mean']):+.2f} pt | {before} | "
            f"{r['macs_fraction_mean']:.1%} ({r['macs_fraction_max']:.1%}) | {r['params_mean']:,.0f} | "
            f"{r['seconds_mean']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--epochs", type=int, default=8, help="epochs before pruning (gdp: with gates)")
    p.add_argument("--finetune", type=int, default=4, help="fine-tune epochs after pruning")
    p.add_argument("--flops", type=float, nargs="+", default=[0.5, 0.25])
    p.add_argument("--methods", nargs="+", default=["l1", "gdp"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--quick", action="store_true", help="1 + 1 epochs, seed 0, 50%% only")
    args = p.parse_args()
    if args.quick:
        args.epochs, args.finetune, args.seeds, args.flops = 1, 1, [0], [0.5]
    runs = []
    jobs = [("dense", 1.0, s) for s in args.seeds] + [(m, f, s) for f in args.flops for m in args.methods for s in args.seeds]
    for i, (method, flops, seed) in enumerate(jobs, 1):
        print(f"[{i}/{len(jobs)}] {method} flops={flops:.0%} seed={seed} ...", flush=True)
        data = digits_loaders(image_size=32, seed=0)  # fresh loaders: the same split and batch order per run
        if method == "dense":
            run = run_dense(data, args.model, args.epochs + args.finetune, seed, args.lr)
        else:
            run = run_method(data, args.model, method, flops, args.epochs, args.finetune, seed, args.lr)
        run["seed"] = seed
        print(f"    accuracy {run['accuracy']:.4f}, MACs {run['macs_fraction']:.1%} of dense, "
              f"{run['params']:,} params, {run['seconds']:.0f} s", flush=True)
        runs.append(run)
    meta = {"model": args.model, "epochs": args.epochs, "finetune": args.finetune, "seeds": args.seeds,
            "lr": args.lr, "image_size": 32, "train_size": len(data.train.dataset),
            "test_size": len(data.test.dataset), "torch": torch.__version__, "python": platform.python_version(),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    rows = aggregate(runs)
    stem = "methods_quick" if args.quick else "methods"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows, "runs": runs}, indent=2))
    md = markdown(rows, meta)
    (RESULTS / f"{stem}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
