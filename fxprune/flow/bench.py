"""The methods benchmark every method issue reports with (``fxprune bench``, benchmarks/methods.py).

Every run trains the same model from scratch on the same data split in the same batch order for
the same total number of epochs; seeds vary only the initial weights:
- ``dense``: ``epochs + finetune`` epochs of ordinary training;
- a method: ``epochs`` with the method's hooks (ordinary training for one-shot methods), decide
  and finalize to the FLOPs target, then ``finetune`` epochs.
With ``pretrained``, every method instead prunes the dense run's trained model of its seed (no
method training: the "no retraining" comparison), calibrating on the training split, then
fine-tunes ``finetune`` epochs (0: none). A method spec may end in ``+compensate`` (refit the
consumers of removed channels, ``compile(compensate=True)``) and/or ``+lop`` (fine-tune
over-parameterized, ``compile(finetune_lop=True)``).
Per run: test accuracy before and after fine-tuning (and of the trained gated model), MACs and
parameters counted on the finalized module, the width each group kept, and wall time per phase.
With ``sparsity`` targets (fractions of zero weights, or ``"2:4"`` for N:M) the weight methods
run instead: every run (dense too) trains ``epochs + finetune`` epochs, since their fixed-mask
fine-tune is part of their schedule; per run the accuracy, the achieved sparsity, the MACs that
multiply non-zero weights and the sparse stored size. A method that cannot take N:M (granet,
sculpt) skips the N:M targets.
Runs go to worker processes (``jobs``), torch on one thread each; results are rewritten
atomically after every run (JSON, markdown, and a PNG of accuracy vs MACs), and ``resume`` skips
runs already in the JSON.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fxprune.errors import ConfigError
from fxprune.files import write_atomic
from fxprune.sparsity import parse_nm

Run = dict[str, Any]


@dataclass(frozen=True)
class BenchConfig:
    methods: tuple[str, ...] = ("l1", "gdp", "greg1", "greg2", "tpp")
    dataset: str = "digits-hard"
    flops: tuple[float, ...] = (0.5, 0.25, 0.1)
    seeds: tuple[int, ...] = (0, 1, 2)
    model: str = "resnet20"
    epochs: int = 8
    finetune: int = 4
    lr: float = 0.05
    batch_size: int = 64
    jobs: int = 1
    out: str = "benchmarks/results/methods"
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    data_options: dict[str, Any] = field(default_factory=dict)  # more digits_loaders arguments (hard=...)
    pretrained: bool = False  # methods prune the trained dense model of their seed (no method training)
    dense_cache: str = ""  # folder of trained dense weights per seed (set by bench when pretrained)
    sparsity: tuple[float | str, ...] = ()  # weight-sparsity targets ("2:4" for N:M) instead of FLOPs

    def runs(self) -> list[tuple[str, float | str, int]]:
        if self.sparsity:
            dense = [("dense", 0.0, s) for s in self.seeds]
            return dense + [(m, t, s) for t in self.sparsity for m in self.methods if _takes(m, t) for s in self.seeds]
        dense = [("dense", 1.0, s) for s in self.seeds]
        return dense + [(m, f, s) for f in self.flops for m in self.methods for s in self.seeds]


def _takes(method: str, target: float | str) -> bool:
    from fxprune.method import METHODS

    return ("nm" if isinstance(target, str) else "sparsity") in getattr(METHODS[parse_method(method)[0]], "budgets", ())


def _key(method: str, target: float | str, seed: int) -> str:
    return f"{method}/{target if isinstance(target, str) else format(target, 'g')}/{seed}"


def _target(run: Run) -> float | str:
    return run["target"] if "target" in run else run["flops_target"]


def parse_target(text: str) -> float | str:
    """A bench sparsity target: ``"0.9"`` (fraction of zero weights) or ``"2:4"`` (N:M)."""
    if ":" in text:
        parse_nm(text)
        return text
    value = float(text)
    if not 0 < value < 1:
        raise ConfigError(f"sparsity target {text!r}: expected a fraction of zero weights in (0, 1)")
    return value


def _budget(target: float | str):
    from fxprune import Budget

    return Budget(nm=parse_nm(target)) if isinstance(target, str) else Budget(sparsity=target)


FLAGS = ("compensate", "lop")


def parse_flags(spec: str) -> tuple[str, set[str]]:
    """``"l1+compensate+lop"``: the method spec and the compile flags after it."""
    method, *flags = spec.split("+")
    unknown = sorted(set(flags) - set(FLAGS))
    if unknown:
        raise ConfigError(f"method spec {spec!r}: unknown flag(s) {unknown}; flags: {', '.join(FLAGS)}")
    return method, set(flags)


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``"gdp"`` or ``"gdp:penalty=uniform;warmup=0.5"``: a registered name and option overrides
    (values read as JSON where they parse, else as strings). The spec is the run's label."""
    name, _, rest = parse_flags(spec)[0].partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(";")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"method spec {spec!r}: expected key=value after ':', got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return name, options


def run_one(cfg: BenchConfig, method: str, flops: float, seed: int) -> Run:
    """One training run (in a worker process)."""
    import fxprune
    from fxprune.data import digits_loaders
    from fxprune.models import build_model
    from fxprune.train import evaluate

    torch.set_num_threads(1)
    data = digits_loaders(batch_size=cfg.batch_size, seed=0, variant=cfg.dataset, **cfg.data_options)  # same split, order
    torch.manual_seed(seed)
    model = build_model(cfg.model, num_classes=data.num_classes)
    x = data.example_inputs()
    dense_macs = fxprune.count_macs(model, x)
    weights = bool(cfg.sparsity)
    run: Run = {"method": method, "target" if weights else "flops_target": flops, "seed": seed}
    if method == "dense" or cfg.pretrained:
        t = time.perf_counter()
        _train_dense(cfg, seed, model, data.train)
        seconds = time.perf_counter() - t
    if method == "dense":
        return {**run, "accuracy": evaluate(model, data.test), "accuracy_before_finetune": None,
                "accuracy_gated": None, "macs": dense_macs, "macs_fraction": 1.0,
                "params": sum(p.numel() for p in model.parameters()), "seconds": {"train": seconds},
                "widths": {}, "method_options": {}, **(_dense_weights(model) if weights else {})}
    if weights:
        return {**run, **_weight_run(cfg, method, flops, model, data, x)}
    name, options = parse_method(method)
    flags = parse_flags(method)[1]
    options = {**cfg.method_options.get(name, {}), **options}
    result = fxprune.compile(model, name, fxprune.Budget(flops=flops), x, train_loader=data.train,
                             eval_loader=data.test, epochs=0 if cfg.pretrained else cfg.epochs,
                             finetune_epochs=cfg.finetune, lr=cfg.lr, progress=False, method_options=options,
                             calib_loader=data.train, compensate="compensate" in flags, finetune_lop="lop" in flags)
    r = result.report
    acc = r.accuracy
    return {**run, "accuracy": acc.get("finetuned", acc["pruned"]), "accuracy_before_finetune": acc["pruned"],
            "accuracy_gated": acc.get("gated"), "macs": r.pruned["flops"],
            "macs_fraction": r.pruned["flops"] / r.dense["flops"], "params": r.pruned["params"],
            "seconds": dict(r.seconds), "method_options": r.method_options,
            "widths": {str(g["id"]): [g["kept"], g["size"]] for g in r.groups if g["prunable"]},
            "max_rel_diff": r.equivalence["max_rel_diff"], "method_report": r.method_report}


def _dense_weights(model: torch.nn.Module) -> Run:
    from fxprune.sparsity import saved_bytes

    return {"sparsity": 0.0, "nonzero_macs_fraction": 1.0, "bytes_dense": saved_bytes(model.state_dict())}


def _weight_run(cfg: BenchConfig, method: str, target: float | str, model: torch.nn.Module, data, x) -> Run:
    """A weight method trained for all the run's epochs (its fixed-mask fine-tune included)."""
    import fxprune

    name, options = parse_method(method)
    result = fxprune.compile(model, name, _budget(target), x, train_loader=data.train, eval_loader=data.test,
                             epochs=cfg.epochs + cfg.finetune, lr=cfg.lr, progress=False,
                             method_options={**cfg.method_options.get(name, {}), **options})
    r = result.report
    z = r.sparsity
    return {"accuracy": r.accuracy["pruned"], "accuracy_before_finetune": None, "accuracy_gated": r.accuracy["gated"],
            "macs": r.pruned["flops"], "macs_fraction": 1.0, "params": r.pruned["params"],
            "sparsity": z["overall"], "nonzero_macs_fraction": z["nonzero_macs"] / z["dense_macs"],
            "bytes_sparse": z["bytes_sparse"], "bytes_dense": z["bytes_dense"],
            "seconds": dict(r.seconds), "method_options": r.method_options, "method_report": r.method_report,
            "widths": {}, "max_rel_diff": r.equivalence["max_rel_diff"]}


def _train_dense(cfg: BenchConfig, seed: int, model: torch.nn.Module, loader) -> None:
    """Train the dense model of ``seed`` (``epochs + finetune`` epochs), or load it from
    ``dense_cache``: in the pretrained mode every method of a seed starts from these weights.
    Training is deterministic on one thread, so a run that trains it gets the same weights."""
    from fxprune.files import atomic_path
    from fxprune.train import train

    path = Path(cfg.dense_cache) / f"{cfg.model}-seed{seed}.pt" if cfg.dense_cache else None
    if path is not None and path.exists():
        model.load_state_dict(torch.load(path))
        return
    train(model, loader, cfg.epochs + cfg.finetune, lr=cfg.lr, progress=False, desc="dense")
    if path is not None:
        with atomic_path(path) as tmp:
            torch.save(model.state_dict(), tmp)


def _spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(runs: list[Run]) -> list[dict[str, Any]]:
    """One row per (method, target): mean and standard deviation over seeds."""
    groups: dict[tuple[str, float | str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run["method"], _target(run)), []).append(run)
    rows = []

    def order(kv: tuple) -> tuple:
        (method, target), rs = kv
        if "target" in rs[0]:  # sparsity: dense, then rising sparsity, N:M last
            return (isinstance(target, str), str(target) if isinstance(target, str) else target,
                    method != "dense", method)
        return (-target, method != "dense", method)

    for (method, target), rs in sorted(groups.items(), key=order):
        accs = [r["accuracy"] for r in rs]
        before = [r["accuracy_before_finetune"] for r in rs if r["accuracy_before_finetune"] is not None]
        phases: dict[str, list[float]] = {}
        for r in rs:
            for phase, s in r["seconds"].items():
                phases.setdefault(phase, []).append(s)
        rows.append({
            "method": method, "flops_target": target if "flops_target" in rs[0] else None, "seeds": len(rs),
            "accuracy_mean": statistics.fmean(accs), "accuracy_std": _spread(accs),
            "accuracy_before_finetune_mean": statistics.fmean(before) if before else None,
            "macs_fraction_mean": statistics.fmean(r["macs_fraction"] for r in rs),
            "macs_fraction_max": max(r["macs_fraction"] for r in rs),
            "params_mean": statistics.fmean(r["params"] for r in rs),
            "seconds_mean": {p: statistics.fmean(v) for p, v in phases.items()},
        })
        if "target" in rs[0]:
            rows[-1].update(target=target, sparsity_mean=statistics.fmean(r["sparsity"] for r in rs),
                            nonzero_macs_fraction_mean=statistics.fmean(r["nonzero_macs_fraction"] for r in rs),
                            bytes_sparse_mean=statistics.fmean(r.get("bytes_sparse", r.get("bytes_dense", 0))
                                                               for r in rs))
    return rows


def markdown_sparsity(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The weight-sparsity table: accuracy, achieved sparsity, non-zero MACs, sparse size."""
    dense = next((r for r in rows if r["method"] == "dense"), None)
    lines = [f"# Weight sparsity on {meta['dataset']} ({meta['model']}, {meta['epochs'] + meta['finetune']} epochs "
             f"per run, seeds {meta['seeds']})", "",
             f"{meta['train_size']} train / {meta['test_size']} {meta.get('evaluated_on', 'test')} images; torch "
             f"{meta['torch']} on {meta['machine']}, one thread per run; {meta['date']}. Every run trains from the "
             "same initial weights of its seed for the same number of epochs in the same batch order; a method's "
             "fixed-mask fine-tune is part of its schedule. Accuracy: mean ± standard deviation over seeds. "
             "Sparsity is counted on the finalized model's prunable weights; non-zero MACs are the conv/linear "
             "MACs that multiply a non-zero weight; size is the torch.save file with each sparse weight stored "
             "as its non-zero values plus a bit mask. Time: wall seconds per phase (prepare / train / finalize).", "",
             "| method | target | accuracy | vs dense | sparsity | non-zero MACs | size (kB) | time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["target"]
        target = "dense" if r["method"] == "dense" else (t if isinstance(t, str) else f"{t:.0%}")
        vs = "" if dense is None else f"{100 * (r['accuracy_mean'] - dense['accuracy_mean']):+.2f} pt"
        secs = " / ".join(f"{v:.0f}" for v in r["seconds_mean"].values())
        lines.append(f"| {r['method']} | {target} | {r['accuracy_mean']:.4f} ± {r['accuracy_std']:.4f} | {vs} | "
                     f"{r['sparsity_mean']:.2%} | {r['nonzero_macs_fraction_mean']:.1%} | "
                     f"{r['bytes_sparse_mean'] / 1e3:,.0f} | {secs} |")
    return "\n".join(lines) + "\n"


def _accuracy_axes(rows: list[dict[str, Any]]):
    """(pyplot, figure, axes) for an accuracy plot, with the dense accuracy as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    dense = next((r for r in rows if r["method"] == "dense"), None)
    if dense is not None:
        ax.axhline(100 * dense["accuracy_mean"], color="black", lw=1, ls="--", label="dense")
    return plt, fig, ax


def _finish(plt, fig, ax, meta: dict[str, Any], path: Path) -> None:
    """Label, then write the PNG atomically."""
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{meta['model']} on {meta['dataset']}, {len(meta['seeds'])} seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def plot_sparsity(rows: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> None:
    """Accuracy vs sparsity (x spaced by log density, so 80/90/95/98% are readable); N:M rows are
    in the table only."""
    import math

    plt, fig, ax = _accuracy_axes(rows)
    ticks: set[float] = set()
    for method in sorted({r["method"] for r in rows} - {"dense"}):
        rs = sorted((r for r in rows if r["method"] == method and not isinstance(r["target"], str)),
                    key=lambda r: r["target"])
        if not rs:
            continue
        ticks.update(r["target"] for r in rs)
        ax.errorbar([-math.log10(1 - r["target"]) for r in rs], [100 * r["accuracy_mean"] for r in rs],
                    yerr=[100 * r["accuracy_std"] for r in rs], marker="o", capsize=3, label=method)
    ax.set_xticks([-math.log10(1 - t) for t in sorted(ticks)], [f"{t:.0%}" for t in sorted(ticks)])
    ax.set_xlabel("weight sparsity (fraction of zero weights)")
    _finish(plt, fig, ax, meta, path)


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    if rows and "target" in rows[0]:
        return markdown_sparsity(rows, meta)
    dense = next((r for r in rows if r["method"] == "dense"), None)
    schedule = (f"each method prunes the seed's trained dense model ({meta['epochs'] + meta['finetune']} epochs), "
                f"then {meta['finetune']} fine-tune epochs" if meta.get("pretrained") else
                f"{meta['epochs']} + {meta['finetune']} epochs")
    lines = [f"# Methods on {meta['dataset']} ({meta['model']}, {schedule}, seeds {meta['seeds']})", "",
             f"{meta['train_size']} train / {meta['test_size']} {meta.get('evaluated_on', 'test')} images; torch {meta['torch']} on "
             f"{meta['machine']}, one thread per run; {meta['date']}. Accuracy: mean ± standard deviation over "
             "seeds; MACs and parameters are counted on the finalized module; time is wall seconds per phase "
             "(prepare / train / finalize / fine-tune), mean over seeds.", "",
             "| method | FLOPs target | accuracy | vs dense | before fine-tune | MACs (% dense, worst seed) | params | time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        before = "" if r["accuracy_before_finetune_mean"] is None else f"{r['accuracy_before_finetune_mean']:.4f}"
        vs = "" if dense is None else f"{100 * (r['accuracy_mean'] - dense['accuracy_mean']):+.2f} pt"
        secs = " / ".join(f"{v:.0f}" for v in r["seconds_mean"].values())
        lines.append(f"| {r['method']} | {r['flops_target']:.0%} | {r['accuracy_mean']:.4f} ± {r['accuracy_std']:.4f} | "
                     f"{vs} | {before} | {r['macs_fraction_mean']:.1%} ({r['macs_fraction_max']:.1%}) | "
                     f"{r['params_mean']:,.0f} | {secs} |")
    return "\n".join(lines) + "\n"


def _width_cells(runs: list[Run]) -> tuple[dict[tuple[str, float], dict[str, list[float]]], list[str]]:
    """{(method, target): {group: [kept fraction per seed]}} and the group ids in order."""
    cells: dict[tuple[str, float], dict[str, list[float]]] = {}
    for r in runs:
        for gid, (kept, size) in r.get("widths", {}).items():
            cells.setdefault((r["method"], r["flops_target"]), {}).setdefault(gid, []).append(kept / size)
    return cells, sorted({g for c in cells.values() for g in c}, key=int)


def widths(runs: list[Run]) -> str:
    """Kept units per group (mean over seeds, as a fraction of the group): where each method pruned."""
    cells, gids = _width_cells(runs)
    if not cells:
        return ""
    lines = ["", "## Kept width per prunable group (fraction of its units, mean over seeds)", "",
             "| method | FLOPs target | " + " | ".join(f"g{g}" for g in gids) + " |",
             "|---|---|" + "---|" * len(gids)]
    for (method, target), c in sorted(cells.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        lines.append(f"| {method} | {target:.0%} | " + " | ".join(
            f"{statistics.fmean(c[g]):.2f}" if g in c else "" for g in gids) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> None:
    """Accuracy vs achieved MACs, one line per method, error bars one standard deviation."""
    plt, fig, ax = _accuracy_axes(rows)
    for method in sorted({r["method"] for r in rows} - {"dense"}):
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["macs_fraction_mean"])
        ax.errorbar([100 * r["macs_fraction_mean"] for r in rs], [100 * r["accuracy_mean"] for r in rs],
                    yerr=[100 * r["accuracy_std"] for r in rs], marker="o", capsize=3, label=method)
    ax.set_xlabel("MACs after pruning (% of dense)")
    _finish(plt, fig, ax, meta, path)


def plot_widths(runs: list[Run], meta: dict[str, Any], path: Path) -> None:
    """One heat map per FLOPs target: methods x groups, the kept fraction of each group (mean over
    seeds), so where each method put its budget reads at a glance; nothing without widths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells, gids = _width_cells(runs)
    if not cells:  # dense runs only, or the weight benchmark
        return
    targets = sorted({t for _, t in cells}, reverse=True)
    methods = sorted({m for m, _ in cells})
    fig, axes = plt.subplots(1, len(targets), figsize=(1.2 + 0.45 * len(gids) * len(targets), 0.9 + 0.32 * len(methods)),
                             dpi=120, squeeze=False)
    for ax, target in zip(axes[0], targets):
        grid = np.full((len(methods), len(gids)), np.nan)
        for i, m in enumerate(methods):
            for j, g in enumerate(gids):
                if g in cells.get((m, target), {}):
                    grid[i, j] = statistics.fmean(cells[(m, target)][g])
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(gids)), [f"g{g}" for g in gids], fontsize=7)
        ax.set_yticks(range(len(methods)), methods if ax is axes[0][0] else [""] * len(methods), fontsize=7)
        ax.set_title(f"{target:.0%} FLOPs", fontsize=9)
    fig.colorbar(image, ax=axes[0].tolist(), label="kept fraction of the group")
    fig.suptitle(f"{meta['model']} on {meta['dataset']}: kept width per group", fontsize=10)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def _meta(cfg: BenchConfig) -> dict[str, Any]:
    from fxprune.data import digits_loaders

    data = digits_loaders(batch_size=cfg.batch_size, seed=0, variant=cfg.dataset, **cfg.data_options)
    return {**{k: v for k, v in asdict(cfg).items() if k not in ("out", "jobs", "data_options", "dense_cache")},
            "seeds": list(cfg.seeds),
            "evaluated_on": "validation" if cfg.data_options.get("validation") else "test",
            "train_size": len(data.train.dataset), "test_size": len(data.test.dataset),
            "torch": torch.__version__, "python": platform.python_version(),
            "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}",
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def write(runs: list[Run], cfg: BenchConfig, meta: dict[str, Any]) -> Path:
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = aggregate(runs)
    write_atomic(out.with_suffix(".json"), json.dumps({"meta": meta, "rows": rows, "runs": runs}, indent=1))
    write_atomic(out.with_suffix(".md"), markdown(rows, meta) + widths(runs))
    if any(r["method"] != "dense" for r in rows):
        (plot_sparsity if cfg.sparsity else plot)(rows, meta, out.with_suffix(".png"))
    plot_widths(runs, meta, out.with_name(out.name + "_widths.png"))
    return out


def bench(cfg: BenchConfig, resume: bool = False, progress: bool = True) -> list[Run]:
    """Run every (method, target, seed) of ``cfg`` and write the results; returns the runs."""
    from fxprune.data import DATASETS
    from fxprune.method import METHODS

    import fxprune.passes.methods  # noqa: F401  (registers the built-in methods)

    unknown = sorted({parse_method(m)[0] for m in cfg.methods} - set(METHODS))
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; available: {sorted(METHODS)}")
    if cfg.dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {cfg.dataset!r}; available: {list(DATASETS)}")
    if any(not 0 < f <= 1 for f in cfg.flops) or cfg.jobs < 1:
        raise ConfigError("flops targets must be fractions in (0, 1] and jobs >= 1")
    kind = "weight" if cfg.sparsity else "channel"
    wrong = [m for m in cfg.methods if METHODS[parse_method(m)[0]].granularity != kind]
    if wrong:
        raise ConfigError(f"method(s) {wrong} do not prune {kind}s: "
                          + (f"sparsity targets need weight methods "
                             f"({', '.join(n for n, c in sorted(METHODS.items()) if c.granularity == 'weight')})"
                             if cfg.sparsity else "FLOPs targets need channel methods; pass --sparsity for these"))
    if cfg.sparsity and cfg.pretrained:
        raise ConfigError("--pretrained compares channel methods without retraining; weight methods train from "
                          "scratch in the sparsity benchmark")
    if not cfg.pretrained or cfg.dense_cache:
        return _run_all(cfg, resume, progress)
    cache = tempfile.mkdtemp(prefix="fxprune-bench-dense-")
    try:
        return _run_all(replace(cfg, dense_cache=cache), resume, progress)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _run_all(cfg: BenchConfig, resume: bool, progress: bool) -> list[Run]:
    """The runs not already done, in worker processes; results rewritten after each."""
    meta = _meta(cfg)
    done: dict[str, Run] = {}
    path = Path(cfg.out).with_suffix(".json")
    if resume and path.exists():
        done = {_key(r["method"], _target(r), r["seed"]): r for r in json.loads(path.read_text())["runs"]}
    todo = [job for job in cfg.runs() if _key(*job) not in done]
    runs = list(done.values())
    bar = tqdm(total=len(todo), desc="bench", disable=not progress)
    with ProcessPoolExecutor(max_workers=cfg.jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(run_one, cfg, *job): job for job in todo}
        for future in as_completed(futures):
            run = future.result()
            runs.append(run)
            write(runs, cfg, meta)
            bar.set_postfix_str(f"{run['method']} {_target(run)} seed {run['seed']}: "
                                f"{run['accuracy']:.3f}")
            bar.update()
    bar.close()
    if not todo:
        write(runs, cfg, meta)
    return runs
