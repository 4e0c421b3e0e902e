"""Latency budgets measured, not assumed (issue 12): predictor error, automatic channel multiple, budgets.

Three parts, each saving benchmarks/results/<stem>.{json,md} with machine info:

- ``predictor``: per model, the LPNet predictor's error on 20 held-out width configurations next to
  the per-layer lookup table's, measured on ONNX Runtime (CPU, 1 thread, batch 1)
  -> ``latency_predictor`` (and a PNG of predicted vs measured);
- ``multiple``: L1 at 50% FLOPs with ``Budget(flops=0.5, backend="onnxruntime")`` (the width step is
  the backend's detected channel multiple, no ``round_to`` given) against plain L1: the realised
  fraction of the FLOPs-proportional speedup -> ``latency_multiple``;
- ``budget``: ``Budget(latency=0.5)`` with l1, wgates and uniform width scaling: measured latency
  relative to dense; on the digits ResNet-20 also accuracy on digits-hard (3 seeds, equal epochs)
  -> ``latency_budget``.

    python benchmarks/latency_budget.py --part predictor
    python benchmarks/latency_budget.py --part budget --models resnet20 --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision

import fxprune
from fxprune.backends import compare_latency, detect_multiple
from fxprune.budget import fewest_meeting
from fxprune.data import digits_loaders
from fxprune.decision import Decision
from fxprune.files import atomic_path, write_atomic
from fxprune.flow.latency_model import build_latency_model
from fxprune.method import Context, Method
from fxprune.models import build_model, calibrate_batchnorm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import machine_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {  # name -> (builder, per-sample input shape)
    "resnet18": (lambda: torchvision.models.resnet18(weights=None), (3, 224, 224)),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(weights=None), (3, 224, 224)),
    "resnet20": (lambda: build_model("resnet20", num_classes=10), (3, 32, 32)),
    "resnet50": (lambda: torchvision.models.resnet50(weights=None), (3, 224, 224)),
    "densenet121": (lambda: torchvision.models.densenet121(weights=None), (3, 224, 224)),
}


class Uniform(Method):
    """Uniform width scaling: every prunable group keeps the same fraction (its best units by L1),
    the largest fraction whose cost meets the budget (the baseline W-Gates compares against)."""

    name = "uniform"

    def decide(self, ctx: Context, data: Any = None) -> Decision:
        from fxprune import scores

        ranked = scores.group_scores("l1", ctx.module, ctx.graph)
        groups = ctx.graph.prunable_groups
        r = ctx.targets.round_to

        def keep_after(k: int) -> dict[int, np.ndarray]:  # k of 1000 steps of width removed
            keep = {}
            for g in groups:
                n = max(min(r, g.size), int(round(g.size * (1 - k / 1000) / r)) * r) if k else g.size
                mask = np.zeros(g.size, dtype=bool)
                mask[np.argsort(-ranked[g.id], kind="stable")[:min(n, g.size)]] = True
                keep[g.id] = mask
            return keep

        k = fewest_meeting(ctx.cost, ctx.targets, keep_after, 1000)
        return Decision(keep_after(999 if k is None else k))


def dense_model(name: str) -> tuple[torch.nn.Module, tuple[int, ...]]:
    build, shape = MODELS[name]
    torch.manual_seed(0)
    dense = build().eval()
    calibrate_batchnorm(dense, torch.randn(4, *shape, generator=torch.Generator().manual_seed(1)))
    return dense, shape


def part_predictor(models: list[str], progress: bool) -> list[dict[str, Any]]:
    rows = []
    for name in models:
        dense, shape = dense_model(name)
        gm = fxprune.trace(dense, (torch.randn(1, *shape),))
        lm = build_latency_model(gm, fxprune.analyze(gm), "onnxruntime", lookup_table=True, progress=progress)
        print(name, lm.summary(), flush=True)
        test = [s for s in lm.samples if s["split"] == "test"]
        rows.append({"model": name, "input": "x".join(map(str, shape)), "groups": len(lm.predictor.groups),
                     "multiple": lm.multiple, "dense_ms": lm.predictor.dense_ms, "lpnet_mape": lm.test_mape,
                     "lpnet_fit_mape": lm.train_mape, "lut_mape": lm.lut_mape, "build_s": lm.seconds,
                     "samples": len(lm.samples), "held_out": test})
    return rows


def part_multiple(models: list[str], progress: bool) -> list[dict[str, Any]]:
    rows = []
    for name in models:
        dense, shape = dense_model(name)
        x = (torch.randn(1, *shape),)
        for label, budget in (("plain (round_to=1)", fxprune.Budget(flops=0.5, round_to=1)),
                              ("automatic (backend='onnxruntime')", fxprune.Budget(flops=0.5, backend="onnxruntime"))):
            r = fxprune.compile(dense, "l1", budget, example_inputs=x, progress=False)
            cmp = compare_latency(dense, r.model, "onnxruntime", example_inputs=x, rounds=5, repeats=10)
            factor = r.report.dense["flops"] / r.report.pruned["flops"]
            rows.append({"model": name, "input": "x".join(map(str, shape)), "widths": label,
                         "round_to": r.prepared.targets.round_to, "flops_factor": factor, "speedup": cmp.speedup,
                         "speedup_min": cmp.speedup_min, "speedup_max": cmp.speedup_max,
                         "dense_ms": cmp.dense.median_ms, "pruned_ms": cmp.pruned.median_ms,
                         "realised": cmp.speedup / factor})
            print(rows[-1], flush=True)
    return rows


def _train_loader(shape: tuple[int, ...], images: int | None, seed: int):
    data = digits_loaders(image_size=shape[-1], batch_size=64 if shape[-1] <= 64 else 16, seed=seed,
                          variant="digits-hard")
    if images is None:
        return data
    subset = torch.utils.data.Subset(data.train.dataset, range(images))
    data.train = torch.utils.data.DataLoader(subset, batch_size=16, shuffle=True,
                                             generator=torch.Generator().manual_seed(seed))
    return data


def part_budget(models: list[str], seeds: list[int], epochs: int, finetune: int, progress: bool,
                methods: tuple[str, ...] = ("l1", "uniform", "wgates")) -> list[dict[str, Any]]:
    rows = []
    for name in models:
        digits = name == "resnet20"
        for seed in seeds if digits else seeds[:1]:
            for method in methods:
                torch.manual_seed(seed)
                if digits:
                    dense = build_model("resnet20", num_classes=10)
                    data = _train_loader((3, 32, 32), None, seed)
                    ep, ft = epochs, finetune
                else:  # latency only: 3 epochs on 64 digits images at 224 so the gates train
                    dense, shape = dense_model(name)
                    data = _train_loader(shape, 64, seed)
                    ep, ft = (3, 0)
                t = time.perf_counter()
                m = Uniform() if method == "uniform" else method
                r = fxprune.compile(dense, m, fxprune.Budget(latency=0.5), example_inputs=data.example_inputs(),
                                    train_loader=data.train, eval_loader=data.test if digits else None,
                                    epochs=ep, finetune_epochs=ft, progress=progress)
                lb = r.report.latency_budget
                kept = {g["id"]: g["kept"] / g["size"] for g in r.report.groups if g["prunable"]}
                rows.append({"model": name, "method": method, "seed": seed, "epochs": ep, "finetune": ft,
                             "target_ms": lb["target_ms"], "dense_ms": lb["dense_ms"], "measured_ms": lb["measured_ms"],
                             "predicted_ms": lb["predicted_ms"], "ratio": lb["ratio"], "met": lb["met"],
                             "decisions": len(lb["attempts"]), "macs_fraction": r.report.pruned["flops"] / r.report.dense["flops"],
                             "accuracy_dense": r.report.accuracy.get("gated") if method != "wgates" else None,
                             "accuracy": r.report.accuracy.get("finetuned", r.report.accuracy.get("pruned")),
                             "widths": kept, "seconds": time.perf_counter() - t})
                print({k: v for k, v in rows[-1].items() if k != "widths"}, flush=True)
    return rows


def _mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def markdown(part: str, rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    head = (f"Device: {info['cpu']}; ONNX Runtime {info['onnxruntime']}, torch {info['torch']}, 1 thread, batch 1; "
            f"{info['date']}; channel multiple {info['multiple']['value']} ({info['multiple']['source']}, "
            f"{info['multiple']['isa']} suggests {info['multiple']['isa_guess']}; time relative to width "
            f"{info['multiple']['reference_width']}: {info['multiple']['ratios']})\n\n")
    if part == "predictor":
        out = ["# LPNet latency predictor vs per-layer lookup table (ONNX Runtime)\n", head,
               "Mean absolute percentage error on 20 held-out width configurations (random per-group widths at the "
               "channel multiple), each measured against the dense model in interleaved rounds. LPNet is fitted on "
               "the other samples; the lookup table times every conv/linear layer alone at its widths and adds the "
               "dense model's remaining time.\n",
               "| model | input | groups | dense ms | samples | LPNet error (held out) | LPNet error (fit) | "
               "lookup table error | build s |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            out.append(f"| {r['model']} | {r['input']} | {r['groups']} | {r['dense_ms']:.3f} | {r['samples']} | "
                       f"{r['lpnet_mape']:.2f}% | {r['lpnet_fit_mape']:.2f}% | {r['lut_mape']:.2f}% | {r['build_s']:.0f} |")
        return "\n".join(out) + "\n"
    if part == "multiple":
        out = ["# L1 at 50% FLOPs: plain widths vs the backend's automatic channel multiple (ONNX Runtime)\n", head,
               "Speedup = median over 5 interleaved rounds of dense/pruned median time; realised = speedup / FLOPs "
               "factor.\n", "| model | input | widths | round_to | FLOPs factor | dense ms | pruned ms | speedup [min–max] | "
               "realised |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            out.append(f"| {r['model']} | {r['input']} | {r['widths']} | {r['round_to']} | {r['flops_factor']:.2f}× | "
                       f"{r['dense_ms']:.2f} | {r['pruned_ms']:.2f} | {r['speedup']:.2f}× [{r['speedup_min']:.2f}–"
                       f"{r['speedup_max']:.2f}] | {r['realised']:.2f} |")
        return "\n".join(out) + "\n"
    out = ["# Budget(latency=0.5) on ONNX Runtime: l1, uniform width scaling, wgates\n", head,
           "Each run builds (or reuses from the cache) the model's LPNet predictor, decides under 50% of the dense "
           "latency, finalizes, and measures the pruned model against the dense one (5 interleaved rounds); a miss "
           "beyond the measurement noise tightens the predictor's target and decides again. ResNet-20: digits-hard "
           "32x32, train then prune (l1, uniform) or train with gates (wgates), then fine-tune; equal epochs, mean ± sd "
           "over seeds. resnet18 / mobilenet_v2 at 224x224: latency only (3 short epochs on 64 images so the gates "
           "train).\n",
           "| model | method | seeds | measured / dense | target met | decisions | predicted ms | measured ms | "
           "MACs fraction | accuracy |", "|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["model"], r["method"]) for r in rows}, key=lambda k: (list(MODELS).index(k[0]), k[1]))
    for model, method in keys:
        rs = [r for r in rows if r["model"] == model and r["method"] == method]
        acc = _mean_sd([r["accuracy"] for r in rs]) if model == "resnet20" else "–"
        out.append(f"| {model} | {method} | {len(rs)} | {_mean_sd([r['ratio'] for r in rs])} | "
                   f"{sum(r['met'] for r in rs)}/{len(rs)} | {_mean_sd([r['decisions'] for r in rs])} | "
                   f"{_mean_sd([r['predicted_ms'] for r in rs])} | {_mean_sd([r['measured_ms'] for r in rs])} | "
                   f"{_mean_sd([r['macs_fraction'] for r in rs])} | {acc} |")
    return "\n".join(out) + "\n"


def plot_predictor(rows: list[dict[str, Any]], path: Path) -> None:
    """Predicted vs measured latency (relative to dense) on the held-out widths, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 4.0), squeeze=False)
    for ax, r in zip(axes[0], rows):
        measured = [s["measured"] for s in r["held_out"]]
        ax.scatter(measured, [s["predicted"] for s in r["held_out"]], s=16, label=f"LPNet ({r['lpnet_mape']:.1f}%)")
        if r.get("lut_mape") is not None:
            ax.scatter(measured, [s["lookup_table"] for s in r["held_out"]], s=16, marker="x",
                       label=f"lookup table ({r['lut_mape']:.1f}%)")
        lo = min(measured + [s["predicted"] for s in r["held_out"]]) * 0.95
        ax.plot([lo, 1.02], [lo, 1.02], color="#999999", lw=0.8)
        ax.set_title(f"{r['model']} ({r['input']})")
        ax.set_xlabel("measured latency / dense")
        ax.set_ylabel("predicted latency / dense")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("predictor", "multiple", "budget"), required=True)
    p.add_argument("--models", default=None, help="comma-separated (default depends on the part)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--finetune", type=int, default=4)
    p.add_argument("--out", default=None, help="output stem (default benchmarks/results/latency_<part>)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--plot-only", action="store_true", help="redraw the predictor plot from its JSON")
    p.add_argument("--methods", default="l1,uniform,wgates", help="budget part: comma-separated methods")
    p.add_argument("--merge", action="store_true",
                   help="budget part: keep the saved rows of the other methods (re-measure only --methods)")
    args = p.parse_args(argv)
    stem = Path(args.out) if args.out else RESULTS / f"latency_{args.part}"
    if args.plot_only:
        plot_predictor(json.loads(stem.with_suffix(".json").read_text())["rows"], stem.with_suffix(".png"))
        print(f"wrote {stem}.png")
        return 0
    torch.set_num_threads(1)
    defaults = {"predictor": "resnet20,resnet18,mobilenet_v2", "multiple": "resnet50,mobilenet_v2,densenet121",
                "budget": "resnet20,resnet18,mobilenet_v2"}
    models = (args.models or defaults[args.part]).split(",")
    progress = not args.no_progress
    if args.part == "predictor":
        rows = part_predictor(models, progress)
    elif args.part == "multiple":
        rows = part_multiple(models, progress)
    else:
        methods = tuple(args.methods.split(","))
        rows = part_budget(models, [int(s) for s in args.seeds.split(",")], args.epochs, args.finetune, progress, methods)
        if args.merge and stem.with_suffix(".json").exists():
            saved = json.loads(stem.with_suffix(".json").read_text())["rows"]
            rows = [r for r in saved if r["method"] not in methods] + rows
    info = {**machine_info("onnxruntime"), "multiple": detect_multiple("onnxruntime").to_dict()}
    write_atomic(stem.with_suffix(".json"), json.dumps({"machine": info, "rows": rows}, indent=2, default=str))
    write_atomic(stem.with_suffix(".md"), markdown(args.part, rows, info))
    if args.part == "predictor":
        plot_predictor(rows, stem.with_suffix(".png"))
    print(f"wrote {stem}.json, {stem}.md")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
