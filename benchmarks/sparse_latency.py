"""Do zero weights run faster? Dense vs weight-sparse latency, measured.

- ONNX Runtime, CPU, 1 thread, batch 1: ResNet-20 (3x32x32) and torchvision resnet18 (3x224x224)
  dense vs one-shot magnitude pruned to 90% sparsity and to 2:4 (``gmp`` / ``nm`` without
  training: latency does not depend on the weights' values), interleaved rounds
  (``fxprune.backends.compare_latency``). ONNX Runtime's CPU kernels are dense: expect 1.0x.
- CUDA with 2:4 sparse tensor cores (``fxprune.backends.sparse24``), where a GPU of compute
  capability >= 8.0 is present: the linear layers of torchvision vit_b_16 alone (each at the
  model's token count) and the whole model, fp16, dense vs 2:4, batch 1 and 32
  (``torch.utils.benchmark``, which synchronises CUDA). Without one, the section records why.

    python benchmarks/sparse_latency.py            # results: benchmarks/results/sparse_latency.{json,md}
    python benchmarks/sparse_latency.py --quick    # fewer rounds: a smoke run
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
from pathlib import Path
from typing import Any

import torch
import torchvision

import fxprune
from fxprune.backends import compare_latency
from fxprune.backends.runners import cpu_name
from fxprune.backends.sparse24 import require_sparse24, to_semi_structured
from fxprune.errors import BackendUnavailable
from fxprune.files import write_atomic
from fxprune.models import build_model

RESULTS = Path(__file__).resolve().parent / "results"


def _sparse(model: torch.nn.Module, x: tuple, budget: fxprune.Budget) -> torch.nn.Module:
    method = "nm" if budget.nm else "gmp"
    return fxprune.compile(model, method, budget, x, progress=False).model.eval()


def onnxruntime_rows(rounds: int) -> list[dict[str, Any]]:
    rows = []
    for name, model, size in (("resnet20", build_model("resnet20", num_classes=10), 32),
                              ("resnet18", torchvision.models.resnet18(weights=None), 224)):
        model.eval()
        x = (torch.randn(1, 3, size, size),)
        for label, budget in (("90% sparse", fxprune.Budget(sparsity=0.9)), ("2:4", fxprune.Budget(nm=(2, 4)))):
            sparse = _sparse(model, x, budget)
            cmp = compare_latency(model, sparse, "onnxruntime", rounds=rounds, example_inputs=x, threads=1)
            rows.append({"model": name, "sparsity": label, "speedup": cmp.speedup, "speedup_min": cmp.speedup_min,
                         "speedup_max": cmp.speedup_max, "dense_ms": cmp.dense.median_ms,
                         "sparse_ms": cmp.pruned.median_ms})
            print(f"onnxruntime {name} {label}: {cmp.speedup:.3f}x", flush=True)
    return rows


def _time_ms(fn, x) -> float:
    from torch.utils import benchmark

    return benchmark.Timer("fn(x)", globals={"fn": fn, "x": x}).blocked_autorange(min_run_time=0.5).median * 1e3


def cuda_rows() -> dict[str, Any]:
    try:
        require_sparse24()
    except BackendUnavailable as exc:
        return {"skipped": str(exc)}
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None).eval()
    x = (torch.randn(1, 3, 224, 224),)
    pruned = _sparse(model, x, fxprune.Budget(nm=(2, 4)))
    fast, converted, dense = to_semi_structured(pruned)
    slow = pruned.to(device="cuda", dtype=torch.float16).eval()
    rows: list[dict[str, Any]] = []
    with torch.no_grad():
        for batch in (1, 32):
            xs = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.float16)
            d, s = _time_ms(slow, xs), _time_ms(fast, xs)
            rows.append({"what": "whole model", "batch": batch, "dense_ms": d, "sparse_ms": s, "speedup": d / s})
            for name in converted[:4]:  # the linear layers alone, at the model's 197 tokens
                dense_layer, sparse_layer = slow.get_submodule(name), fast.get_submodule(name)
                tokens = torch.randn(batch * 197, dense_layer.in_features, device="cuda", dtype=torch.float16)
                d, s = _time_ms(dense_layer, tokens), _time_ms(sparse_layer, tokens)
                rows.append({"what": f"linear {name} {tuple(dense_layer.weight.shape)}", "batch": batch,
                             "dense_ms": d, "sparse_ms": s, "speedup": d / s})
    return {"device": torch.cuda.get_device_name(), "converted": len(converted), "kept_dense": dense, "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Weight sparsity and latency", "", f"{result['machine']}; torch {result['torch']}; {result['date']}.", "",
             "## ONNX Runtime, CPU, 1 thread, batch 1 (interleaved rounds; speedup = median of per-round ratios)", "",
             "| model | weights | dense (ms) | sparse (ms) | speedup (min-max) |", "|---|---|---|---|---|"]
    for r in result["onnxruntime"]:
        lines.append(f"| {r['model']} | {r['sparsity']} | {r['dense_ms']:.3f} | {r['sparse_ms']:.3f} | "
                     f"{r['speedup']:.3f} ({r['speedup_min']:.3f}-{r['speedup_max']:.3f}) |")
    lines += ["", "## CUDA, 2:4 sparse tensor cores (fp16)", ""]
    cuda = result["cuda"]
    if "skipped" in cuda:
        lines.append(f"Not measured: {cuda['skipped']}.")
    else:
        lines += [f"{cuda['device']}; {cuda['converted']} layers converted, {len(cuda['kept_dense'])} kept dense.", "",
                  "| what | batch | dense (ms) | 2:4 (ms) | speedup |", "|---|---|---|---|---|"]
        lines += [f"| {r['what']} | {r['batch']} | {r['dense_ms']:.3f} | {r['sparse_ms']:.3f} | {r['speedup']:.2f} |"
                  for r in cuda["rows"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(RESULTS / "sparse_latency"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    result = {"machine": f"{cpu_name()}, {platform.machine()}", "torch": torch.__version__,
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "onnxruntime": onnxruntime_rows(3 if args.quick else 9), "cuda": cuda_rows()}
    out = Path(args.out)
    write_atomic(out.with_suffix(".json"), json.dumps(result, indent=1))
    write_atomic(out.with_suffix(".md"), markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
