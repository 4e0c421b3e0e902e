"""DSA's time claim (issue 10): end-to-end wall time to a pruned model at the budget, DSA against
iterative budgeted pruning, on digits-hard (ResNet-20), seeds 0,1,2, each run on one torch thread.

- ``dsa`` from scratch: ``epochs`` of search from random weights, then ``finetune`` epochs (the
  methods benchmark's schedule, 8 + 4); ``dsa:warmup=0.5`` the same with its first half dense;
- ``iterative``: the traditional flow: train dense ``epochs + finetune`` epochs, then ``rounds``
  rounds of L1 pruning to budgets spaced geometrically down to the target, each followed by
  ``finetune`` epochs.
The time ratio of the two follows mostly from these schedules (an epoch costs about the same in
both); what the claim adds is "at no loss of accuracy", which is what this measures.

    python benchmarks/dsa_time.py                     # 50% FLOPs, seeds 0,1,2, two runs at a time
    python benchmarks/dsa_time.py --flops 0.25 --out benchmarks/results/dsa_time_25

Results: benchmarks/results/dsa_time.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

import torch

import fxprune
from fxprune.data import digits_loaders
from fxprune.files import write_atomic
from fxprune.models import build_model
from fxprune.train import evaluate, train


def run(flow: str, flops: float, seed: int, epochs: int, finetune: int, rounds: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    data = digits_loaders(batch_size=64, seed=0, variant="digits-hard")
    torch.manual_seed(seed)
    model = build_model("resnet20", num_classes=data.num_classes)
    x = data.example_inputs()
    start = time.perf_counter()
    if flow.startswith("dsa"):
        options = {"warmup": float(flow.partition("=")[2])} if "=" in flow else {}
        r = fxprune.compile(model, "dsa", fxprune.Budget(flops=flops), x, train_loader=data.train,
                            eval_loader=data.test, epochs=epochs, finetune_epochs=finetune, lr=0.05, progress=False,
                            method_options=options)
        pruned, fraction, total_epochs = r.model, r.report.pruned["flops"] / r.report.dense["flops"], epochs + finetune
    else:
        dense = fxprune.count_macs(model, x)
        train(model, data.train, epochs + finetune, lr=0.05, progress=False)
        pruned = model
        for k in range(1, rounds + 1):
            target = flops ** (k / rounds) * dense / fxprune.count_macs(pruned, x)  # of the current model
            pruned = fxprune.compile(pruned, "l1", fxprune.Budget(flops=min(target, 1.0)), x, train_loader=data.train,
                                     finetune_epochs=finetune, lr=0.05, progress=False).model
        fraction, total_epochs = fxprune.count_macs(pruned, x) / dense, epochs + finetune * (rounds + 1)
    seconds = time.perf_counter() - start
    return {"flow": flow, "seed": seed, "accuracy": evaluate(pruned, data.test), "seconds": seconds,
            "macs_fraction": fraction, "epochs": total_epochs}


def markdown(runs: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"# DSA vs iterative budgeted pruning: time to {meta['flops']:.0%} FLOPs (digits-hard, ResNet-20)", "",
             f"{meta['machine']}, torch {meta['torch']}, one thread per run, {meta['date']}. DSA: {meta['epochs']} "
             f"search + {meta['finetune']} fine-tune epochs from scratch. Iterative: {meta['epochs'] + meta['finetune']} "
             f"dense epochs, then {meta['rounds']} rounds of L1 to geometrically spaced budgets, {meta['finetune']} "
             "fine-tune epochs each. Mean ± standard deviation over seeds.", "",
             "| flow | epochs | wall time (s) | accuracy | MACs (% dense) |", "|---|---|---|---|---|"]
    by: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by.setdefault(r["flow"], []).append(r)
    for flow, rs in by.items():
        t = [r["seconds"] for r in rs]
        a = [r["accuracy"] for r in rs]
        sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
        lines.append(f"| {flow} | {rs[0]['epochs']} | {statistics.mean(t):.0f} ± {sd(t):.0f} | "
                     f"{statistics.mean(a):.4f} ± {sd(a):.4f} | {100 * max(r['macs_fraction'] for r in rs):.1f}% |")
    if "iterative" in by:
        slow = statistics.mean(r["seconds"] for r in by["iterative"])
        lines += [""] + [f"Iterative / {flow} wall time: **{slow / statistics.mean(r['seconds'] for r in rs):.2f}x**."
                         for flow, rs in by.items() if flow != "iterative"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flops", type=float, default=0.5)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--finetune", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/dsa_time")
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    flows = ("dsa", "dsa:warmup=0.5", "iterative")
    jobs = [(flow, a.flops, s, a.epochs, a.finetune, a.rounds) for flow in flows for s in seeds]
    with ProcessPoolExecutor(a.jobs, mp_context=get_context("spawn")) as pool:
        runs = list(pool.map(run, *zip(*jobs)))
    meta = {"flops": a.flops, "seeds": seeds, "epochs": a.epochs, "finetune": a.finetune, "rounds": a.rounds,
            "torch": torch.__version__, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads available",
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    write_atomic(a.out + ".json", json.dumps({"meta": meta, "runs": runs}, indent=1))
    write_atomic(a.out + ".md", markdown(runs, meta))
    print(markdown(runs, meta))


if __name__ == "__main__":
    main()
