"""What fxprune.trace captures on the torchvision zoo, and what still becomes an opaque leaf.

For every torchvision classification, segmentation and detection model (``weights=None``,
eval mode), trace it on one example input and record: traced or the TraceError, the leaves
(submodules whose forward could not be captured) with their reasons, the node count, and how
many channel groups the analysis finds prunable. Detection models take a list of images.

    python benchmarks/trace_zoo.py                    # every model (a few minutes on 2 cores)
    python benchmarks/trace_zoo.py --models resnet18,fasterrcnn_resnet50_fpn   # update these rows

Results: benchmarks/results/trace_zoo.{json,md}, rewritten atomically after every model.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path
from typing import Any

import torch
import torchvision

import fxprune
from fxprune.files import write_atomic

RESULTS = Path(__file__).resolve().parent / "results"
FAMILIES = {
    "classification": torchvision.models,
    "segmentation": torchvision.models.segmentation,
    "detection": torchvision.models.detection,
}
SIZE = {"vit_": 224, "swin": 224, "maxvit": 224, "inception_v3": 96}
SKIP = {"vit_h_14", "regnet_y_128gf", "vit_l_16", "vit_l_32"}  # 300M+ parameters: minutes each here


def example(name: str, family: str) -> tuple[Any, ...]:
    size = next((s for prefix, s in SIZE.items() if name.startswith(prefix)), 96 if family != "classification" else 64)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    return ([x[0]],) if family == "detection" else (x,)


def build(name: str, family: str) -> torch.nn.Module:
    kwargs = {"weights": None}
    if family != "classification":
        kwargs["weights_backbone"] = None
    return torchvision.models.get_model(name, **kwargs).eval()


def scan(name: str, family: str) -> dict[str, Any]:
    torch.manual_seed(0)
    row: dict[str, Any] = {"model": name, "family": family}
    try:
        gm = fxprune.trace(build(name, family), example(name, family))
    except fxprune.TraceError as exc:
        return {**row, "traced": False, "error": str(exc).splitlines()[0][:300]}
    leaves = gm.meta.get("fxprune_leaf_modules", {})
    row.update(traced=True, nodes=len(gm.graph.nodes), leaves=leaves)
    try:
        summary = fxprune.analyze(gm).summary()
        row.update(groups=summary["groups"], prunable_groups=summary["prunable_groups"])
    except fxprune.FxpruneError as exc:
        row["analysis_error"] = str(exc).splitlines()[0][:300]
    return row


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    traced = [r for r in rows if r.get("traced")]
    with_leaves = [r for r in traced if r["leaves"]]
    lines = ["# fxprune.trace on the torchvision zoo", "",
             f"{meta['date']}, torch {meta['torch']}, torchvision {meta['torchvision']}. "
             f"{len(traced)} of {len(rows)} models traced; {len(with_leaves)} of them with opaque leaves "
             "(submodules whose forward could not be captured: their channels stay unprunable).", "",
             "| model | family | traced | nodes | prunable groups | leaves (reason) |", "|---|---|---|---|---|---|"]
    for r in rows:
        if not r.get("traced"):
            lines.append(f"| {r['model']} | {r['family']} | no: {r['error']} | | | |")
            continue
        leaves = "; ".join(f"`{k}`: {v}" for k, v in r["leaves"].items()) or "none"
        lines.append(f"| {r['model']} | {r['family']} | yes | {r['nodes']} | "
                     f"{r.get('prunable_groups', '')} of {r.get('groups', '')} | {leaves} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=None, help="comma-separated names (default: every model)")
    args = p.parse_args()
    torch.set_num_threads(1)
    jobs = [(n, f) for f, mod in FAMILIES.items() for n in torchvision.models.list_models(module=mod) if n not in SKIP]
    if args.models:
        wanted = set(args.models.split(","))
        jobs = [(n, f) for n, f in jobs if n in wanted]
    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
            "torchvision": torchvision.__version__}
    path = RESULTS / "trace_zoo.json"
    kept = {r["model"]: r for r in json.loads(path.read_text())["rows"]} if args.models and path.exists() else {}
    rows = []
    for i, (name, family) in enumerate(jobs, 1):
        kept.pop(name, None)
        rows.append(scan(name, family))
        print(f"[{i}/{len(jobs)}] {name}: {'traced' if rows[-1].get('traced') else 'TraceError'}"
              f"{', leaves ' + ', '.join(rows[-1]['leaves']) if rows[-1].get('leaves') else ''}", flush=True)
        RESULTS.mkdir(exist_ok=True)
        everything = list(kept.values()) + rows  # --models updates those rows of an earlier run
        write_atomic(path, json.dumps({"meta": meta, "rows": everything}, indent=1, default=str))
        write_atomic(RESULTS / "trace_zoo.md", markdown(everything, meta))


if __name__ == "__main__":
    main()
