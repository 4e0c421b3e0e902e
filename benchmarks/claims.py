"""The claims benchmark (issue 28): each seed paper's headline claim, tested the way the paper tests it.

The papers' pipeline, scaled to this machine (ResNet-20 on 16x16 digits-hard; VGG-8 for the
functionality claim, the plain VGG-style net that paper prunes):
- per seed, a dense model trained to convergence ONCE (``dense_epochs``; at 16x16 digits-hard RN20's
  validation accuracy plateaus from epoch ~12) and cached in ``runs/claims-cache/`` under a key of
  everything that determines its weights; every arm of that seed prunes this model;
- a trained-decision method then trains ``method_epochs`` with its hooks on the dense model, is
  finalized to the FLOPs target and fine-tuned ``finetune_epochs``; a one-shot method (l1)
  fine-tunes ``method_epochs + finetune_epochs``; a from-scratch arm (DSA's headline) trains from
  the seed's initial weights for ``dense_epochs + method_epochs``, then fine-tunes: every arm of a
  claim has the same total epochs (``schedule``); ``finetune_epochs`` is where l1's fine-tune curve
  (recorded per run, on the validation split) has plateaued;
- the no-retraining claim (functionality) compares before any fine-tune, both arms at l1's
  per-layer widths, raw and with BatchNorm statistics re-estimated;
- BatchNorm re-estimation (``bn_batches``) after finalize in every arm (``compile(bn_recalibration=)``).

Learning rate: every arm is run at each rate of ``lrs`` on the ``lr_seeds``; the rate with the best
mean *validation* accuracy (a stratified ``validation`` split of the training images; the models
train on the rest) is chosen, and the arm's other seeds run only at that rate. The test split is
read only for the reported accuracy. Same data split and batch order in every run; seeds vary
the initial weights. Verdict per claim: d = mean(arm) - mean(baseline) over seeds,
se = sqrt(s_a^2/n_a + s_b^2/n_b); ``holds`` if d > 2 se, ``does not hold`` if d < -2 se, else
``within noise`` (for a >=/~ claim that is what the claim says).

Cost, measured on the 2-core development machine (one thread per run), as CPU seconds per run,
which is the wall time with a core to itself: dense RN20 20 epochs ~22 s, a pretrained arm
(10 + 15 epochs: gdp 32.9 s, greg1 31.3 s, tpp and wgates similar), DSA from scratch (30 + 15
epochs) ~65 s, a no-retraining arm ~15 s. The full config, LR chosen on seed 0 (3 rates x 10
trained arms on seed 0, then 2 more seeds at the chosen rate: 50 runs, plus 6 no-retraining runs),
is ~1,900 CPU s: ~16 min with ``--jobs 2`` on an idle machine (+1 min for the dense models when
not cached), and ~44 min at the contention the measurements ran under (wall = 2.8 x CPU). With
``--lr-seeds 0,1,2`` (every rate on every seed, 90 runs) ~28 min idle, beyond 45 min under that
contention: hence seed 0 by default. l1's fine-tune curve (seed 0, rate 0.02, validation accuracy
after 10 / 25 / 40 fine-tune epochs: 84.4 / 85.1 / 85.1%) is flat from ~12 epochs, so 25 is on the
plateau; ``--quick`` runs in ~40 s idle (2 min under that contention).

    python benchmarks/claims.py [--jobs 2] [--seeds 0,1,2] [--claims gdp,tpp,...] [--quick] [--resume]

Results: ``benchmarks/results/claims.{json,md}`` (``--out``), rewritten atomically after every run;
``--resume`` skips the runs already in the JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import functools
import hashlib
import json
import math
import os
import platform
import statistics
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fxprune.errors import ConfigError
from fxprune.files import write_atomic
from fxprune.flow.bench import BenchConfig, _spread, _train_dense, parse_method

Run = dict[str, Any]


@dataclass(frozen=True)
class Arm:
    """One way of producing a pruned model: a method spec (``"tpp:opp_weight=0"``, as ``fxprune
    bench`` reads it), the model, and the pipeline: ``pretrained`` (prune the cached dense model,
    fine-tune), ``scratch`` (the method trains from the initial weights) or ``notrain`` (prune the
    dense model, no fine-tune: ``widths_from`` names the arm whose per-layer widths it takes)."""

    spec: str
    model: str = "resnet20"
    pipeline: str = "pretrained"
    widths_from: str | None = None


ARMS: dict[str, Arm] = {
    "l1": Arm("l1"),
    "gdp": Arm("gdp"),
    "dais": Arm("dais"),
    "dsa-scratch": Arm("dsa", pipeline="scratch"),
    "greg1": Arm("greg1:start=0"),  # from the trained model, as the paper: regularize from the first step
    "greg2": Arm("greg2:start=0"),
    "tpp": Arm("tpp:start=0"),
    "tpp-no-gram": Arm("tpp:start=0;opp_weight=0"),
    "wgates": Arm("wgates"),
    "wgates-internal": Arm("wgates:scope=internal"),
    "l1-vgg8": Arm("l1", model="vgg8", pipeline="notrain"),
    "functionality-vgg8": Arm("functionality:merge=true", model="vgg8", pipeline="notrain", widths_from="l1"),
}


@dataclass(frozen=True)
class Claim:
    """One row: ``arm`` against ``baseline`` on ``stage`` (``test``: after fine-tuning; ``pruned`` /
    ``pruned_bn``: before fine-tuning, raw / BatchNorm re-estimated); ``relation`` ">" or ">="."""

    group: str  # what --claims selects
    paper: str
    claim: str
    setting: str
    arm: str
    baseline: str
    relation: str = ">"
    stage: str = "test"


CLAIMS: tuple[Claim, ...] = (
    Claim("gdp", "GDP (Guo et al., ICCV 2021)", "beats the state of the art at equal FLOPs",
          "CIFAR-10 ResNet-56/VGG-16, pretrained, then fine-tune", "gdp", "l1"),
    Claim("dais", "DAIS (Guan et al., TNNLS 2023)", "beats the state of the art",
          "CIFAR-10/100 ResNet-56, VGG-16, pretrained", "dais", "l1"),
    Claim("dsa", "DSA (Ning et al., ECCV 2020)", "from scratch, no pretrained model needed, at least as "
          "accurate as the pretrain-prune-fine-tune flow", "CIFAR-10 ResNet-56, budgeted FLOPs", "dsa-scratch", "l1",
          ">="),
    Claim("greg", "GReg-1 (Wang et al., ICLR 2021)", "regularising the pruned set to zero beats one-shot removal "
          "by the same L1 criterion", "CIFAR-10 ResNet-56, VGG-19, pretrained", "greg1", "l1"),
    Claim("greg", "GReg-2 (Wang et al., ICLR 2021)", "growing regularisation before choosing the pruned set is at "
          "least as good as GReg-1", "CIFAR-10 ResNet-56, pretrained", "greg2", "greg1", ">="),
    Claim("tpp", "TPP (Wang & Fu, ICLR 2023)", "beats GReg-1 (trainability preserved)",
          "CIFAR-10 ResNet-56, VGG-19, pretrained", "tpp", "greg1"),
    Claim("tpp", "TPP (Wang & Fu, ICLR 2023)", "beats L1 filter pruning", "CIFAR-10 ResNet-56, pretrained",
          "tpp", "l1"),
    Claim("tpp", "TPP ablation (ours)", "the Gram (orthogonality) term adds to the BN penalty and zero-out",
          "the paper's ablation, Table 6", "tpp", "tpp-no-gram"),
    Claim("wgates", "W-Gates (Li et al.)", "weight-conditioned gates beat hand-crafted criteria",
          "ImageNet ResNet-34/50, MobileNet, pretrained", "wgates", "l1"),
    Claim("wgates", "W-Gates, block-internal only (library recipe)", "the usual ResNet recipe: prune only "
          "block-internal channels", "(no paper claim)", "wgates-internal", "l1"),
    Claim("functionality", "Functionality (Qin et al., arXiv 1810.07322)", "removing functionally redundant "
          "filters needs no retraining: better than L1 at the same per-layer widths", "VGG-16, CIFAR-10, no "
          "fine-tune", "functionality-vgg8", "l1-vgg8", stage="pruned"),
    Claim("functionality", "Functionality, BN re-estimated (ours)", "the same after re-estimating BatchNorm "
          "statistics", "VGG-16, CIFAR-10, no fine-tune", "functionality-vgg8", "l1-vgg8", stage="pruned_bn"),
)


@dataclass(frozen=True)
class ClaimsConfig:
    claims: tuple[str, ...] = tuple(dict.fromkeys(c.group for c in CLAIMS))
    seeds: tuple[int, ...] = (0, 1, 2)
    lr_seeds: tuple[int, ...] = (0,)  # the seeds whose validation accuracy chooses each arm's rate
    lrs: tuple[float, ...] = (0.005, 0.02, 0.05)
    flops: float = 0.4
    dataset: str = "digits-hard"
    image_size: int = 16
    validation: float = 0.2  # of the training images: the models train on the rest
    batch_size: int = 64
    dense_epochs: int = 20
    dense_lr: float = 0.05
    method_epochs: int = 10
    finetune_epochs: int = 15
    bn_batches: int = 20
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per method name, under the specs
    jobs: int = 1
    out: str = "benchmarks/results/claims"
    cache: str = "runs/claims-cache"

    def arms(self) -> list[str]:
        """The arms the chosen claims compare (and the arms whose widths they borrow), in table order."""
        names = [n for c in CLAIMS if c.group in self.claims for n in (c.arm, c.baseline)]
        return list(dict.fromkeys(names))


QUICK = dict(seeds=(0,), lr_seeds=(0,), lrs=(0.05,), dense_epochs=2, method_epochs=1, finetune_epochs=1,
             bn_batches=4, method_options={"functionality": {"ascent_steps": 10}})


def needs_training(spec: str) -> bool:
    from fxprune.method import METHODS

    import fxprune.passes.methods  # noqa: F401  (registers the built-in methods)

    return METHODS[parse_method(spec)[0]].needs_training


def schedule(cfg: ClaimsConfig, arm: Arm) -> dict[str, int]:
    """Epochs per phase of ``arm``: ``dense`` (the cached model's), ``method`` (training with the
    method's hooks), ``finetune``; ``total`` is equal across the arms of a claim."""
    d, m, f = cfg.dense_epochs, cfg.method_epochs, cfg.finetune_epochs
    if arm.pipeline == "notrain":
        phases = {"dense": d, "method": 0, "finetune": 0}
    elif arm.pipeline == "scratch":
        phases = {"dense": 0, "method": d + m, "finetune": f}
    elif needs_training(arm.spec):
        phases = {"dense": d, "method": m, "finetune": f}
    else:  # one-shot: the method epochs go to fine-tuning
        phases = {"dense": d, "method": 0, "finetune": m + f}
    return {**phases, "total": sum(phases.values())}


def splits(cfg: ClaimsConfig):
    """(train, validation, test) loaders: the models train on the training images minus a stratified
    validation split; the test split is the usual one, normalised like the training images. Fresh
    loaders per call, so every run sees the same batch order (``digits_loaders``' seeded shuffle)."""
    from torch.utils.data import DataLoader, TensorDataset

    (xt, yt), val, test = _split_tensors(cfg.dataset, cfg.image_size, cfg.validation)
    train = DataLoader(TensorDataset(xt, yt), batch_size=cfg.batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    return train, *(DataLoader(TensorDataset(*t), batch_size=cfg.batch_size, shuffle=False) for t in (val, test))


@functools.lru_cache(maxsize=4)
def _split_tensors(dataset: str, image_size: int, validation: float):
    """The three splits' (images, labels), built once per process (the distortions take seconds)."""
    from fxprune.data import digits_loaders

    held = digits_loaders(validation=validation, seed=0, variant=dataset, image_size=image_size)
    full = digits_loaders(seed=0, variant=dataset, image_size=image_size)
    # full's images are normalised to mean 0 / std 1 over all training images, held's over its train part:
    # both are affine in the raw pixels, and held's train + validation are exactly full's training images
    u = torch.cat([held.train.dataset.tensors[0], held.test.dataset.tensors[0]])[:, :1]
    x, y = full.test.dataset.tensors
    return held.train.dataset.tensors, held.test.dataset.tensors, (x * u.std() + u.mean(), y)


def _bench_config(cfg: ClaimsConfig, model: str) -> BenchConfig:
    """The methods benchmark's dense trainer, pointed at this config's cache folder (a key of every
    setting that determines the dense weights)."""
    keyed = {k: getattr(cfg, k) for k in ("dataset", "image_size", "validation", "batch_size", "dense_epochs",
                                          "dense_lr")}
    key = hashlib.sha1(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:10]
    return BenchConfig(model=model, epochs=cfg.dense_epochs, finetune=0, lr=cfg.dense_lr, batch_size=cfg.batch_size,
                       dense_cache=str(Path(cfg.cache) / key))


def dense_path(cfg: ClaimsConfig, model: str, seed: int) -> Path:
    return Path(_bench_config(cfg, model).dense_cache) / f"{model}-seed{seed}.pt"


def dense_model(cfg: ClaimsConfig, model: str, seed: int) -> torch.nn.Module:
    """The seed's converged dense model: trained once, then read from the cache."""
    from fxprune.models import build_model

    torch.manual_seed(seed)
    net = build_model(model, num_classes=10)
    _train_dense(_bench_config(cfg, model), seed, net, splits(cfg)[0])
    return net


def _numbers(report: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Every numeric entry of a method's report (nested dicts flattened as ``a.b``)."""
    out: dict[str, float] = {}
    for key, value in report.items():
        if isinstance(value, dict):
            out.update(_numbers(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f"{prefix}{key}"] = float(value)
    return out


def run_dense(cfg: ClaimsConfig, model: str, seed: int) -> Run:
    """Train (or find cached) the dense model of ``seed``; its validation and test accuracy."""
    from fxprune.train import evaluate

    cached = dense_path(cfg, model, seed).exists()
    t = time.perf_counter()
    net = dense_model(cfg, model, seed)
    _, val, test = splits(cfg)
    return {"kind": "dense", "arm": f"dense-{model}", "model": model, "seed": seed, "lr": cfg.dense_lr,
            "cached": cached, "val": evaluate(net, val), "test": evaluate(net, test),
            "seconds": time.perf_counter() - t}


def run_arm(cfg: ClaimsConfig, name: str, lr: float | None, seed: int) -> Run:
    """One arm at one rate and seed (in a worker process)."""
    import fxprune
    from fxprune.models import build_model
    from fxprune.train import evaluate

    arm = ARMS[name]
    train, val, test = splits(cfg)
    phases = schedule(cfg, arm)
    if arm.pipeline == "scratch":
        torch.manual_seed(seed)
        net = build_model(arm.model, num_classes=10)
    else:
        net = dense_model(cfg, arm.model, seed)
    method, options = parse_method(arm.spec)
    options = {**cfg.method_options.get(method, {}), **options}
    x = train.dataset.tensors[0][:1]
    budget = fxprune.Budget(flops=cfg.flops)
    notrain = arm.pipeline == "notrain"
    evaluate_on = test if notrain else val  # no rate to choose without training: report test directly
    if arm.widths_from is not None:
        base = fxprune.compile(net, arm.widths_from, budget, x, progress=False, calib_loader=train)
        options["widths"] = {g["id"]: g["kept"] for g in base.report.groups if g["prunable"]}
    t = time.perf_counter()
    torch.manual_seed(seed)
    result = fxprune.compile(net, method, budget, x, train_loader=train, eval_loader=evaluate_on,
                             epochs=phases["method"], finetune_epochs=phases["finetune"], lr=lr or cfg.dense_lr,
                             progress=False, method_options=options, calib_loader=train,
                             bn_recalibration=cfg.bn_batches)
    r = result.report
    acc = {k: v for k, v in r.accuracy.items() if v is not None}
    return {"kind": "arm", "arm": name, "spec": arm.spec, "model": arm.model, "pipeline": arm.pipeline,
            "lr": lr, "seed": seed, "epochs": phases, "method_options": r.method_options,
            "val": None if notrain else acc.get("finetuned", acc.get("pruned_bn")),
            "test": evaluate(result.model, test),
            "stages": acc, "stages_on": "test" if notrain else "validation",
            "macs_fraction": r.pruned["flops"] / r.dense["flops"],
            "finetune_curve": [e["eval_acc"] for e in r.epochs if e["phase"] == "finetune"],
            "diagnostics": _numbers(r.method_report), "seconds": time.perf_counter() - t,
            "seconds_phases": dict(r.seconds)}


def key(run: Run) -> str:
    return f"{run['arm']}/{run['lr']}/{run['seed']}"


def choose_lr(runs: list[Run], arm: str, lr_seeds: tuple[int, ...], lrs: tuple[float, ...]) -> float | None:
    """The rate of ``lrs`` with the best mean *validation* accuracy of ``arm`` over ``lr_seeds`` (the
    test accuracy is never read; ties go to the smaller rate); ``None`` until every (rate, seed) ran."""
    val = {(r["lr"], r["seed"]): r["val"] for r in runs if r["arm"] == arm and r.get("kind") == "arm"}
    if any((lr, s) not in val for lr in lrs for s in lr_seeds):
        return None
    return max(lrs, key=lambda lr: (statistics.fmean(val[lr, s] for s in lr_seeds), -lr))


def verdict(arm: list[float], base: list[float]) -> dict[str, Any]:
    """Difference of means against twice its standard error (``within noise`` between; no verdict
    from a single seed, which has no spread)."""
    diff = statistics.fmean(arm) - statistics.fmean(base)
    se = math.sqrt(_spread(arm) ** 2 / len(arm) + _spread(base) ** 2 / len(base))
    word = ("no spread (one seed)" if min(len(arm), len(base)) < 2 else
            "holds" if diff > 2 * se else "does not hold" if diff < -2 * se else "within noise")
    return {"difference": diff, "se": se, "verdict": word}


def _selected(runs: list[Run], cfg: ClaimsConfig, arm: str) -> list[Run]:
    """The arm's runs at its chosen rate, one per seed."""
    lr = choose_lr(runs, arm, cfg.lr_seeds, cfg.lrs) if ARMS[arm].pipeline != "notrain" else None
    return [r for r in runs if r["arm"] == arm and r["lr"] == lr and r["kind"] == "arm"]


def _value(run: Run, stage: str) -> float:
    return run["test"] if stage == "test" else run["stages"][stage]


def summarise(runs: list[Run], cfg: ClaimsConfig) -> dict[str, Any]:
    """Per arm: the chosen rate, validation by rate, test mean/std at it, diagnostics; per claim: the verdict."""
    arms = {}
    for name in cfg.arms():
        chosen = _selected(runs, cfg, name)
        if not chosen:
            continue
        val_by_lr: dict[str, list[float]] = {}
        for r in runs:
            if r["arm"] == name and r["seed"] in cfg.lr_seeds and r["val"] is not None:
                val_by_lr.setdefault(str(r["lr"]), []).append(r["val"])
        diag: dict[str, list[float]] = {}
        for r in chosen:
            for k, v in r["diagnostics"].items():
                diag.setdefault(k, []).append(v)
        stages = {s: statistics.fmean(r["stages"][s] for r in chosen) for s in chosen[0]["stages"]
                  if all(s in r["stages"] for r in chosen)}
        curves = [r["finetune_curve"] for r in chosen if r["finetune_curve"]]
        arms[name] = {"spec": ARMS[name].spec, "model": ARMS[name].model, "pipeline": ARMS[name].pipeline,
                      "lr": chosen[0]["lr"], "seeds": sorted(r["seed"] for r in chosen),
                      "epochs": chosen[0]["epochs"],
                      "val_by_lr": {k: statistics.fmean(v) for k, v in val_by_lr.items()},
                      "test": [r["test"] for r in chosen], "test_mean": statistics.fmean(r["test"] for r in chosen),
                      "test_std": _spread([r["test"] for r in chosen]), "stages": stages,
                      "stages_on": chosen[0]["stages_on"],
                      "macs_fraction": max(r["macs_fraction"] for r in chosen),
                      "finetune_curve": [statistics.fmean(c) for c in zip(*curves)] if curves else [],
                      "diagnostics": {k: statistics.fmean(v) for k, v in sorted(diag.items())},
                      "seconds": statistics.fmean(r["seconds"] for r in chosen)}
    rows = []
    for c in CLAIMS:
        if c.group not in cfg.claims:
            continue
        a, b = _selected(runs, cfg, c.arm), _selected(runs, cfg, c.baseline)
        row = {**asdict(c), "arm_mean": None, "baseline_mean": None, "verdict": "not run"}
        if a and b:
            va, vb = [_value(r, c.stage) for r in a], [_value(r, c.stage) for r in b]
            row.update(arm_mean=statistics.fmean(va), baseline_mean=statistics.fmean(vb), **verdict(va, vb))
        rows.append(row)
    dense = {}
    for r in runs:
        if r["kind"] == "dense":
            dense.setdefault(r["model"], []).append(r)
    dense_rows = {m: {"val_mean": statistics.fmean(r["val"] for r in rs),
                      "test_mean": statistics.fmean(r["test"] for r in rs),
                      "test_std": _spread([r["test"] for r in rs]), "seeds": len(rs)} for m, rs in dense.items()}
    return {"claims": rows, "arms": arms, "dense": dense_rows}


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    cfg = meta["config"]
    lines = [f"# Claims benchmark ({cfg['dataset']} {cfg['image_size']}x{cfg['image_size']}, {cfg['flops']:.0%} FLOPs, "
             f"seeds {cfg['seeds']})", "",
             f"Dense {cfg['dense_epochs']} epochs (cached per seed), then method {cfg['method_epochs']} + fine-tune "
             f"{cfg['finetune_epochs']} epochs (one-shot methods fine-tune both; from scratch: "
             f"{cfg['dense_epochs']} + {cfg['method_epochs']} method epochs, then the fine-tune); learning rate per "
             f"arm from {cfg['lrs']} by mean validation accuracy on seeds {cfg['lr_seeds']} "
             f"({meta['train_size']} train / {meta['val_size']} validation images, split from the training images); "
             f"accuracy on the {meta['test_size']} test images; BatchNorm re-estimated on {cfg['bn_batches']} batches "
             f"after finalize. torch {meta['torch']} on {meta['machine']}, one thread per run; {meta['date']}.", "",
             "Verdict: d = difference of the means over seeds, se its standard error; holds if d > 2 se, does not "
             "hold if d < -2 se, else within noise (what a >= claim predicts when the arms are equal). Stage: test = "
             "after fine-tuning; pruned / pruned_bn = before fine-tuning, raw / BatchNorm re-estimated.", "",
             "| paper | claim | paper's setting | arm | baseline | stage | arm | baseline | d ± 2 se (pt) | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["claims"]:
        nums = ("| | | |" if r["arm_mean"] is None else
                f"| {100 * r['arm_mean']:.2f} | {100 * r['baseline_mean']:.2f} | "
                f"{100 * r['difference']:+.2f} ± {200 * r['se']:.2f} |")
        lines.append(f"| {r['paper']} | {r['claim']} ({r['relation']}) | {r['setting']} | {r['arm']} | {r['baseline']} "
                     f"| {r['stage']} {nums} {r['verdict']} |")
    lines += ["", "## Arms", "", "| arm | spec | model | pipeline | epochs (method + fine-tune = total) | lr | "
              "validation by lr | test (mean ± std) | before fine-tune raw / BN | MACs (worst) | s per run |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, d in summary["dense"].items():
        lines.append(f"| dense-{m} | | {m} | dense | {cfg['dense_epochs']} | {cfg['dense_lr']} | "
                     f"{100 * d['val_mean']:.1f} "
                     f"| {100 * d['test_mean']:.2f} ± {100 * d['test_std']:.2f} | | 100% | |")
    for name, a in summary["arms"].items():
        e = a["epochs"]
        vals = ", ".join(f"{lr}: {100 * v:.1f}" for lr, v in a["val_by_lr"].items())
        s = a["stages"]
        before = f"{100 * s.get('pruned', math.nan):.1f} / {100 * s.get('pruned_bn', math.nan):.1f} ({a['stages_on']})"
        lines.append(f"| {name} | `{a['spec']}` | {a['model']} | {a['pipeline']} | {e['method']} + {e['finetune']} = "
                     f"{e['total']} | {a['lr']} | {vals} | {100 * a['test_mean']:.2f} ± {100 * a['test_std']:.2f} | "
                     f"{before} | {a['macs_fraction']:.1%} | {a['seconds']:.0f} |")
    lines += ["", "## Mechanism diagnostics (every numeric key of the method's report, mean over seeds)", ""]
    for name, a in summary["arms"].items():
        if a["diagnostics"]:
            lines.append(f"- **{name}**: " + ", ".join(f"{k} {v:.4g}" for k, v in a["diagnostics"].items()))
    curves = {n: a["finetune_curve"] for n, a in summary["arms"].items() if a["finetune_curve"]}
    if curves:
        lines += ["", "## Fine-tune curves (validation accuracy % per fine-tune epoch, mean over seeds)", ""]
        lines += [f"- {n}: " + " ".join(f"{100 * v:.1f}" for v in c) for n, c in curves.items()]
    return "\n".join(lines) + "\n"


def _meta(cfg: ClaimsConfig) -> dict[str, Any]:
    train, val, test = splits(cfg)
    return {"config": {k: v for k, v in asdict(cfg).items() if k not in ("jobs", "out", "cache")},
            "train_size": len(train.dataset), "val_size": len(val.dataset), "test_size": len(test.dataset),
            "torch": torch.__version__, "python": platform.python_version(),
            "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}",
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def write(runs: list[Run], cfg: ClaimsConfig, meta: dict[str, Any]) -> dict[str, Any]:
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = summarise(runs, cfg)
    write_atomic(out.with_suffix(".json"), json.dumps({"meta": meta, **summary, "runs": runs}, indent=1))
    write_atomic(out.with_suffix(".md"), markdown(summary, meta))
    return summary


def _check(cfg: ClaimsConfig) -> None:
    from fxprune.method import METHODS

    groups = {c.group for c in CLAIMS}
    unknown = sorted(set(cfg.claims) - groups)
    if unknown:
        raise ConfigError(f"--claims: unknown claim(s) {unknown}; available: {', '.join(sorted(groups))}")
    missing = sorted({parse_method(ARMS[a].spec)[0] for a in cfg.arms()} - set(METHODS))
    if missing:
        raise ConfigError(f"arm method(s) {missing} are not registered; available: {sorted(METHODS)}")
    if not set(cfg.lr_seeds) <= set(cfg.seeds) or not cfg.lr_seeds:
        raise ConfigError(f"--lr-seeds {cfg.lr_seeds} must be a non-empty subset of --seeds {cfg.seeds}")


def run_claims(cfg: ClaimsConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Dense models first (trained or read from the cache), then every arm: the ``lr_seeds`` at
    every rate, and, once an arm's rate is chosen, its other seeds at that rate. Returns the summary."""
    import fxprune.passes.methods  # noqa: F401  (registers the built-in methods)

    _check(cfg)
    meta = _meta(cfg)
    path = Path(cfg.out).with_suffix(".json")
    runs: list[Run] = json.loads(path.read_text())["runs"] if resume and path.exists() else []
    done = {key(r) for r in runs}
    arms = cfg.arms()
    models = sorted({ARMS[a].model for a in arms if ARMS[a].pipeline != "scratch"})
    dense = [(m, s) for m in models for s in cfg.seeds if f"dense-{m}/{cfg.dense_lr}/{s}" not in done]
    first = [(a, lr, s) for a in arms for s in cfg.seeds for lr in
             ((None,) if ARMS[a].pipeline == "notrain" else cfg.lrs if s in cfg.lr_seeds else ())]
    first = [j for j in first if f"{j[0]}/{j[1]}/{j[2]}" not in done]
    later = {a: [s for s in cfg.seeds if s not in cfg.lr_seeds] for a in arms if ARMS[a].pipeline != "notrain"}
    total = len(dense) + len(first) + sum(
        1 for a, ss in later.items() for s in ss if not any(r["arm"] == a and r["seed"] == s for r in runs))
    bar = tqdm(total=total, desc="claims", disable=not progress)

    def record(run: Run) -> list[tuple]:
        """Keep and write ``run``; the jobs it unblocks (an arm's other seeds, once its rate is chosen)."""
        runs.append(run)
        write(runs, cfg, meta)
        bar.set_postfix_str(f"{run['arm']} lr {run['lr']} seed {run['seed']}: test {run['test']:.3f}")
        bar.update()
        return unblocked()

    def unblocked() -> list[tuple]:
        jobs = []
        for a in list(later):
            lr = choose_lr(runs, a, cfg.lr_seeds, cfg.lrs)
            if lr is not None:
                jobs += [(run_arm, a, lr, s) for s in later.pop(a) if f"{a}/{lr}/{s}" not in {key(r) for r in runs}]
        return jobs

    phases = [[(run_dense, m, s) for m, s in dense], [(run_arm, *job) for job in first]]
    if cfg.jobs == 1:  # in this process: no worker start, the splits built once
        for queue in phases:
            queue += unblocked()
            while queue:
                fn, *args = queue.pop(0)
                queue += record(fn(cfg, *args))
    else:
        with ProcessPoolExecutor(max_workers=cfg.jobs, mp_context=get_context("spawn"), initializer=torch.set_num_threads,
                                 initargs=(1,)) as pool:
            for queue in phases:  # the dense models are all cached before any arm starts
                futures = {pool.submit(fn, cfg, *args) for fn, *args in queue + unblocked()}
                while futures:
                    finished, futures = wait(futures, return_when=FIRST_COMPLETED)
                    for f in finished:
                        futures |= {pool.submit(fn, cfg, *args) for fn, *args in record(f.result())}
    bar.close()
    return write(runs, cfg, meta)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--seeds", type=_ints)
    p.add_argument("--lr-seeds", type=_ints, help="seeds whose validation accuracy picks each arm's rate (default: 0)")
    p.add_argument("--claims", type=lambda t: tuple(t.split(",")), help=f"of {sorted({c.group for c in CLAIMS})}")
    p.add_argument("--quick", action="store_true", help="a tiny schedule, for a smoke test")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--out", default=None)
    for name in ("dense_epochs", "method_epochs", "finetune_epochs"):
        p.add_argument("--" + name.replace("_", "-"), type=int)
    a = p.parse_args(argv)
    over = {**(QUICK if a.quick else {}), **{k: v for k, v in dict(
        jobs=a.jobs, seeds=a.seeds, claims=a.claims, dense_epochs=a.dense_epochs, method_epochs=a.method_epochs,
        finetune_epochs=a.finetune_epochs).items() if v is not None}}
    over["out"] = a.out or ("benchmarks/results/claims_quick" if a.quick else ClaimsConfig.out)
    if a.lr_seeds is not None:
        over["lr_seeds"] = a.lr_seeds
    elif a.seeds is not None:
        over["lr_seeds"] = a.seeds[:1]
    cfg = dataclasses.replace(ClaimsConfig(), **over)
    torch.set_num_threads(1)  # one thread per run (workers: their initializer); the library leaves it to callers
    summary = run_claims(cfg, resume=a.resume)
    for r in summary["claims"]:
        print(f"{r['paper']}: {r['arm']} {r['relation']} {r['baseline']} ({r['stage']}): {r['verdict']}")


if __name__ == "__main__":
    main()
