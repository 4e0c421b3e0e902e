"""The ``fxprune`` command line: ``compile``, ``analyze``, ``bench``, ``report`` (redraw a run's page) and ``compare``."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fxprune import checks
from fxprune.backends import export_backends, latency_backends
from fxprune.data import DATASETS
from fxprune.errors import ConfigError, FxpruneError
from fxprune.files import atomic_path, write_atomic
from fxprune.flow.html import render as render_html
from fxprune.flow.api import get_method  # noqa: F401  (the flow registers the built-in methods)
from fxprune.method import method_names


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def _nm(text: str) -> tuple[int, int]:
    from fxprune.sparsity import parse_nm

    try:
        return parse_nm(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _targets(text: str) -> tuple[float | str, ...]:
    from fxprune.flow.bench import parse_target

    try:
        return tuple(parse_target(v) for v in text.split(",") if v)
    except (ConfigError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(v for v in text.split(",") if v)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxprune", description="Prune convolutional networks with torch.fx.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="prune a model on a dataset and write the model and a report")
    c.add_argument("--model", default="resnet20",
                   help="resnet20/resnet56/vgg11_bn/vgg16_bn, a torchvision name, timm:<name>, or "
                        "package.module:factory (your own code; called with num_classes= if it takes it)")
    c.add_argument("--dataset", default="digits",
                   help=f"{' or '.join(DATASETS)} (bundled), or a folder ROOT with ROOT/train/<class>/ and "
                        "ROOT/val/<class>/ images (ImageFolder layout)")
    c.add_argument("--num-classes", type=int, default=None, help="classes of the model (default: the dataset's)")
    c.add_argument("--checkpoint", default=None, help="a state_dict file to start from (your trained weights)")
    c.add_argument("--workers", type=int, default=2, help="data loading processes for an image folder")
    c.add_argument("--method", default="gdp", choices=method_names())
    c.add_argument("--flops", type=float, default=None, help="FLOPs budget: fraction of dense (0-1] or absolute MACs")
    c.add_argument("--params", type=float, default=None, help="parameter budget: fraction or absolute count")
    c.add_argument("--latency", type=float, default=None,
                   help="latency budget: fraction of the dense latency measured on --backend (fitted LPNet predictor)")
    c.add_argument("--latency-ms", type=float, default=None, help="latency budget in milliseconds on --backend")
    c.add_argument("--backend", choices=list(latency_backends()), default=None,
                   help="where a latency budget is measured (default onnxruntime); also sets the width step to "
                        "its detected channel multiple unless --round-to is given")
    c.add_argument("--round-to", type=int, default=None,
                   help="keep group widths a multiple of this (default 1, or the --backend's channel multiple)")
    c.add_argument("--sparsity", type=float, default=None,
                   help="weight-sparsity budget: fraction of zero weights (for gmp, cyclical, granet, lap, sculpt)")
    c.add_argument("--nm", type=_nm, default=None, help="N:M weight budget, e.g. 2:4 (for nm, gmp, cyclical, lap)")
    c.add_argument("--scope", choices=("global", "layer"), default="global",
                   help="sparsity over all prunable weights together or per layer")
    c.add_argument("--dense-ends", action="store_true", help="keep the first and last layer dense")
    c.add_argument("--epochs", type=int, default=8, help="training epochs with the method's loss (dense training for l1)")
    c.add_argument("--finetune-epochs", type=int, default=4)
    c.add_argument("--compensate", action="store_true",
                   help="refit the consumers of removed channels on the training images (no retraining needed)")
    c.add_argument("--lop", action="store_true", help="fine-tune linearly over-parameterized, collapse back")
    c.add_argument("--bn-recalibration", type=int, default=0, metavar="N",
                   help="re-estimate BatchNorm statistics on N training batches after pruning (default 0: off); "
                        "the report gives the accuracy before fine-tuning with and without")
    c.add_argument("--lr", type=float, default=0.05)
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--image-size", "--input-size", type=int, default=32, help="input images are this many pixels square")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", default=None,
                   help="output folder (default runs/<model>-<method>-<time>); must be new or empty")
    c.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out, replacing an earlier run's files there")
    c.add_argument("--export", choices=list(export_backends()), default=None,
                   help="also write model.onnx (validated in ONNX Runtime) or model.engine (TensorRT)")
    c.add_argument("--validate", action="append", default=[], choices=list(latency_backends()),
                   help="measure dense vs pruned latency on this backend (repeatable)")
    c.add_argument("--no-progress", action="store_true")
    b = sub.add_parser("bench", help="compare methods on the same data, budget and schedule (JSON, markdown, PNG)")
    b.add_argument("--methods", type=_names, default=("l1", "gdp", "greg1", "greg2", "tpp"),
                   help=f"comma-separated, from {', '.join(method_names())}")
    b.add_argument("--dataset", default="digits-hard", choices=list(DATASETS))
    b.add_argument("--flops", type=_floats, default=(0.5, 0.25, 0.1), help="comma-separated FLOPs targets")
    b.add_argument("--sparsity", type=_targets, default=(),
                   help="weight-sparsity targets instead of FLOPs, e.g. 0.8,0.9,0.95,0.98,2:4 (weight methods)")
    b.add_argument("--seeds", type=lambda t: tuple(int(v) for v in t.split(",")), default=(0, 1, 2))
    b.add_argument("--model", default="resnet20")
    b.add_argument("--epochs", type=int, default=8, help="epochs before pruning (with the method's hooks)")
    b.add_argument("--finetune", type=int, default=4, help="fine-tune epochs after pruning")
    b.add_argument("--jobs", type=int, default=1, help="runs in parallel (one torch thread each)")
    b.add_argument("--out", default="benchmarks/results/methods", help="output stem (.json, .md, .png)")
    b.add_argument("--resume", action="store_true", help="skip runs already in the output JSON")
    b.add_argument("--pretrained", action="store_true",
                   help="every method prunes its seed's trained dense model (no method training; the "
                        "no-retraining comparison); method specs may end in +compensate and/or +lop")
    b.add_argument("--validation", type=float, default=0.0,
                   help="hold this fraction of the training split out and report on it instead of the test split")
    b.add_argument("--no-progress", action="store_true")
    r = sub.add_parser("report", help="redraw RUN_DIR/report.html from its report.json")
    r.add_argument("run_dir")
    m = sub.add_parser("compare", help="plot accuracy against MACs (and latency) of several runs")
    m.add_argument("run_dirs", nargs="+")
    m.add_argument("--out", default="compare.png")
    lm = sub.add_parser("latency-model", help="measure width samples on a backend, fit the LPNet latency predictor "
                                              "(cached for latency budgets) and print its error")
    lm.add_argument("--model", default="resnet20")
    lm.add_argument("--input-size", type=int, default=32)
    lm.add_argument("--num-classes", type=int, default=10)
    lm.add_argument("--backend", choices=list(latency_backends()), default="onnxruntime")
    lm.add_argument("--samples", type=int, default=80, help="width configurations measured (fit + held out)")
    lm.add_argument("--holdout", type=int, default=20, help="of those, held out to report the error")
    lm.add_argument("--lookup-table", action="store_true", help="also measure the per-layer lookup table's error")
    lm.add_argument("--no-cache", action="store_true", help="measure again even if a cached predictor exists")
    lm.add_argument("--json", default=None, help="also write every measured sample to this JSON file")
    lm.add_argument("--no-progress", action="store_true")
    a = sub.add_parser("analyze", help="print the channel groups of a model")
    a.add_argument("--model", default="resnet18")
    a.add_argument("--input-size", type=int, default=64)
    a.add_argument("--json", action="store_true", help="print the full channel graph as JSON")
    return p


# What ``fxprune compile`` writes into its folder (an older run's files are replaced, or removed
# with --overwrite when this run does not write them).
RUN_FILES = ("model.pt", "model.fxprune", "model.onnx", "model.engine", "report.json", "report.html", "summary.txt")


def _out_folder(args: argparse.Namespace) -> Path:
    """The run folder, checked before any work: new or empty, unless --overwrite; writable."""
    out = Path(args.out or f"runs/{args.model}-{args.method}-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise ConfigError(f"--out {out} already holds files ({', '.join(sorted(p.name for p in out.iterdir())[:5])}); "
                          "choose a new folder, or pass --overwrite to replace that run")
    return checks.writable_dir(out, "--out")


def _compile(args: argparse.Namespace) -> int:
    import fxprune
    from fxprune.backends import require_backend
    from fxprune.backends.tensorrt import require_tensorrt
    from fxprune.data import digits_loaders, image_folder_loaders
    from fxprune.models import load_checkpoint, model_from_spec

    if args.sparsity is not None or args.nm is not None:
        budget = fxprune.Budget(sparsity=args.sparsity, nm=args.nm, scope=args.scope, dense_ends=args.dense_ends)
    else:
        timed = args.latency is not None or args.latency_ms is not None
        flops = args.flops if args.flops is not None or args.params is not None or timed else 0.5
        budget = fxprune.Budget(flops=flops, params=args.params, round_to=args.round_to, latency=args.latency,
                                latency_ms=args.latency_ms, backend=args.backend)
    if args.export == "tensorrt":
        require_tensorrt()
    for backend in args.validate:
        require_backend(backend)
    out = _out_folder(args)
    torch.manual_seed(args.seed)
    if args.dataset in DATASETS:
        data = digits_loaders(image_size=args.image_size, batch_size=args.batch_size, seed=args.seed,
                              variant=args.dataset)
    else:
        data = image_folder_loaders(args.dataset, image_size=args.image_size, batch_size=args.batch_size,
                                    num_workers=args.workers, seed=args.seed)
    model = model_from_spec(args.model, num_classes=args.num_classes or data.num_classes)
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint)
    print(f"fxprune: {args.method} on {args.model}, {args.dataset} ({len(data.train.dataset)} train / "
          f"{len(data.test.dataset)} test), budget {budget.to_dict()}", flush=True)
    result = fxprune.compile(
        model, args.method, budget, data.example_inputs(), train_loader=data.train, eval_loader=data.test,
        epochs=args.epochs, finetune_epochs=args.finetune_epochs, lr=args.lr,
        progress=not args.no_progress, validate=args.validate, compensate=args.compensate, finetune_lop=args.lop,
        bn_recalibration=args.bn_recalibration,
    )
    with atomic_path(out / "model.pt") as tmp:
        torch.save(result.model, tmp)
    fxprune.save(result.model, out / "model.fxprune")  # record + weights: fxprune.load rebuilds it from code
    report, summary = result.report.to_dict(), result.report.summary()
    written = [out / "model.pt", out / "model.fxprune", out / "report.json", out / "summary.txt"]
    if args.export:
        suffix = ".onnx" if args.export == "onnx" else ".engine"
        exported = fxprune.export(result.model, out / f"model{suffix}", backend=args.export,
                                  example_inputs=data.example_inputs())
        report["export"] = exported.to_dict()
        summary += (f"\nexport ({args.export}): {exported.path}, max abs diff vs PyTorch "
                    f"{exported.max_abs_diff:.2e} at batch sizes {exported.checked_batch_sizes}")
        written.insert(1, Path(exported.path))
    text = json.dumps(report, indent=2, default=str)
    write_atomic(out / "report.json", text)
    write_atomic(out / "summary.txt", summary + "\n")
    write_atomic(out / "report.html", render_html(json.loads(text), summary))  # the page reads what the file holds
    written.append(out / "report.html")
    for stale in set(RUN_FILES) - {p.name for p in written}:  # an earlier run's, replaced by this one
        (out / stale).unlink(missing_ok=True)
    print(summary)
    print("wrote " + ", ".join(map(str, written)))
    return 0


def _latency_model(args: argparse.Namespace) -> int:
    import fxprune
    from fxprune.backends import require_backend
    from fxprune.flow.latency_model import build_latency_model
    from fxprune.models import model_from_spec

    record = require_backend(args.backend)
    if args.json:
        checks.writable_file(args.json, "--json")
    model = model_from_spec(args.model, num_classes=args.num_classes)
    x = torch.randn(1, 3, args.input_size, args.input_size)
    gm = fxprune.trace(model, (x,))
    multiple = record.multiple()
    print(f"fxprune: {args.backend} channel multiple {multiple.value} ({multiple.source}; {multiple.isa} suggests "
          f"{multiple.isa_guess}; time relative to width {multiple.reference_width}: {multiple.ratios})", flush=True)
    lm = build_latency_model(gm, fxprune.analyze(gm), args.backend, samples=args.samples, holdout=args.holdout,
                             multiple=multiple.value, lookup_table=args.lookup_table, cache=not args.no_cache,
                             progress=not args.no_progress)
    print(lm.summary())
    print(f"cache: {lm.cache_path}")
    if args.json:
        record = {**lm.to_dict(), "channel_multiple": multiple.to_dict()}
        write_atomic(args.json, json.dumps(record, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from fxprune.flow.html import write_report

    print(f"wrote {write_report(args.run_dir)}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from fxprune.flow.html import compare

    print(f"wrote {compare(args.run_dirs, args.out)}")
    return 0


def _analyze(args: argparse.Namespace) -> int:
    import fxprune
    from fxprune.models import REFERENCE_MODELS, build_model

    model = build_model(args.model, num_classes=10 if args.model in REFERENCE_MODELS else 1000).eval()
    cg = fxprune.analyze(fxprune.trace(model, (torch.randn(1, 3, args.input_size, args.input_size),)))
    if args.json:
        print(json.dumps(cg.to_dict(), indent=1))
        return 0
    print(json.dumps(cg.summary()))
    for g in cg.groups:
        state = "prunable" if g.prunable else f"fixed: {g.reason}"
        print(f"group {g.id:3d} size {g.size:5d} producers {','.join(g.spaces)[:60]:60s} {state}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from fxprune.flow.bench import BenchConfig, bench, markdown, aggregate

    checks.writable_dir(Path(args.out).parent, "--out")  # before hours of runs, not after
    cfg = BenchConfig(methods=args.methods, dataset=args.dataset, flops=args.flops, seeds=args.seeds,
                      model=args.model, epochs=args.epochs, finetune=args.finetune, jobs=args.jobs, out=args.out,
                      data_options={"validation": args.validation} if args.validation else {},
                      pretrained=args.pretrained, sparsity=args.sparsity)
    runs = bench(cfg, resume=args.resume, progress=not args.no_progress)
    print(Path(args.out).with_suffix(".md").read_text() if runs else markdown(aggregate(runs), {}))
    print(f"wrote {args.out}.json, .md, .png")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"compile": _compile, "analyze": _analyze, "bench": _bench, "report": _report,
                "latency-model": _latency_model,
                "compare": _compare}[args.command](args)
    except FxpruneError as exc:
        print(f"fxprune: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
