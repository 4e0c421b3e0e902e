"""One short run per growing-regularization method (resnet20, digits-hard, 50% FLOPs, seed 0, 8 epochs
from scratch, no fine-tune): the final kept/pruned magnitude ratio, the integrated penalty and the
accuracy of the pruned model raw and with BatchNorm re-estimated. ``python benchmarks/greg_schedule.py
greg1 greg2 tpp``; prints one JSON line per method."""
from __future__ import annotations

import json
import sys
import time

import torch

import fxprune
from fxprune.data import digits_loaders
from fxprune.models import build_model


def run(method: str, epochs: int = 8, seed: int = 0) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    data = digits_loaders(image_size=16, variant="digits-hard", seed=seed)
    model = build_model("resnet20")
    t = time.perf_counter()
    r = fxprune.compile(model, method, fxprune.Budget(flops=0.5), data.example_inputs(), train_loader=data.train,
                        eval_loader=data.test, epochs=epochs, lr=0.05, progress=False, bn_recalibration=10)
    return {"method": method, "accuracy": r.report.accuracy, "last_epoch": r.report.epochs[-1]["extra"],
            "train_acc": [round(e["train_acc"], 3) for e in r.report.epochs],
            "method_report": r.report.method_report, "seconds": round(time.perf_counter() - t, 1)}


if __name__ == "__main__":
    for name in sys.argv[1:] or ["greg1", "greg2", "tpp"]:
        print(json.dumps(run(name), default=str), flush=True)
