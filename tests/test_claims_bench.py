"""The claims benchmark's protocol (benchmarks/claims.py): verdict rule, learning rate chosen on the
validation split only, equal total epochs per claim, the dense cache, and a tiny end-to-end run."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import claims  # noqa: E402

TINY = dict(image_size=8, dense_epochs=1, method_epochs=1, finetune_epochs=1, bn_batches=2, seeds=(0, 1),
            lr_seeds=(0,), lrs=(0.05, 0.01), method_options={"functionality": {"ascent_steps": 5}})


def test_verdict_rule_on_constructed_numbers() -> None:
    base = [0.80, 0.82, 0.81]  # std 0.01, se of the difference with an equal spread: 0.01 * sqrt(2/3) = 0.0082
    assert claims.verdict([0.90, 0.92, 0.91], base)["verdict"] == "holds"
    assert claims.verdict([0.70, 0.72, 0.71], base)["verdict"] == "does not hold"
    within = claims.verdict([0.81, 0.83, 0.82], base)  # d = 0.01 < 2 se = 0.0163
    assert within["verdict"] == "within noise"
    assert within["difference"] == pytest.approx(0.01)
    assert within["se"] == pytest.approx(0.01 * (2 / 3) ** 0.5)
    assert claims.verdict([0.83, 0.85, 0.84], base)["verdict"] == "holds"  # d = 0.03 > 0.0163
    assert claims.verdict([0.9], [0.8])["verdict"] == "no spread (one seed)"


def _run(arm: str, lr: float, seed: int, val: float, test: float) -> dict:
    return {"kind": "arm", "arm": arm, "lr": lr, "seed": seed, "val": val, "test": test}


def test_lr_is_chosen_on_validation_never_test() -> None:
    lrs = (0.005, 0.02, 0.05)
    runs = [_run("gdp", 0.005, 0, 0.70, 0.90), _run("gdp", 0.02, 0, 0.85, 0.60), _run("gdp", 0.05, 0, 0.80, 0.95),
            _run("gdp", 0.02, 1, 0.10, 0.99), _run("l1", 0.05, 0, 0.99, 0.99)]
    assert claims.choose_lr(runs, "gdp", (0,), lrs) == 0.02  # best validation; the test split prefers 0.05
    assert claims.choose_lr(runs, "gdp", (0, 1), lrs) is None  # seed 1 has not run every rate yet
    runs += [_run("gdp", 0.005, 1, 0.95, 0.1), _run("gdp", 0.05, 1, 0.30, 0.1)]
    assert claims.choose_lr(runs, "gdp", (0, 1), lrs) == 0.005  # mean validation 0.825 vs 0.475 and 0.55
    tie = [_run("x", lr, 0, 0.5, 0.0) for lr in lrs]
    assert claims.choose_lr(tie, "x", (0,), lrs) == 0.005


def test_equal_total_epochs_in_every_claim() -> None:
    cfg = claims.ClaimsConfig(dense_epochs=20, method_epochs=7, finetune_epochs=11)
    for c in claims.CLAIMS:
        a, b = (claims.schedule(cfg, claims.ARMS[n]) for n in (c.arm, c.baseline))
        assert a["total"] == b["total"], c
    l1 = claims.schedule(cfg, claims.ARMS["l1"])
    assert l1 == {"dense": 20, "method": 0, "finetune": 18, "total": 38}  # one-shot: method epochs fine-tune
    assert claims.schedule(cfg, claims.ARMS["dsa-scratch"]) == {"dense": 0, "method": 27, "finetune": 11, "total": 38}
    assert claims.schedule(cfg, claims.ARMS["gdp"]) == {"dense": 20, "method": 7, "finetune": 11, "total": 38}
    assert claims.schedule(cfg, claims.ARMS["functionality-vgg8"])["finetune"] == 0


def test_splits_hold_validation_out_and_normalise_test_like_training() -> None:
    from fxprune.data import digits_loaders

    cfg = claims.ClaimsConfig(image_size=8)
    train, val, test = claims.splits(cfg)
    full = digits_loaders(image_size=8, variant=cfg.dataset, seed=0)
    assert len(train.dataset) + len(val.dataset) == len(full.train.dataset)
    assert len(test.dataset) == len(full.test.dataset)
    # the test images in the training part's normalisation: the full training split, mapped the same
    # way, is exactly the training part plus the validation split
    u = torch.cat([train.dataset.tensors[0], val.dataset.tensors[0]])
    mapped = full.train.dataset.tensors[0] * u[:, :1].std() + u[:, :1].mean()
    key = lambda t: torch.sort(t.flatten(1).sum(1)).values  # noqa: E731
    assert torch.allclose(key(mapped), key(u), atol=1e-3)
    assert torch.allclose(test.dataset.tensors[0], full.test.dataset.tensors[0] * u[:, :1].std() + u[:, :1].mean())
    assert abs(float(test.dataset.tensors[0].mean())) < 0.2  # same distribution as the training images
    held = digits_loaders(image_size=8, variant=cfg.dataset, seed=0, validation=cfg.validation).train
    again = claims.splits(cfg)[0]
    for (x, y), (x1, y1), (x2, y2) in zip(train, again, held):  # the same batch order in every run
        assert torch.equal(x, x1) and torch.equal(x, x2) and torch.equal(y, y2)


@pytest.mark.usefixtures("one_torch_thread")
def test_dense_model_is_trained_once_then_read_from_cache(tmp_path, monkeypatch) -> None:
    import fxprune.train

    calls = []
    real = fxprune.train.train
    monkeypatch.setattr(fxprune.train, "train", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = dataclasses.replace(claims.ClaimsConfig(**TINY), cache=str(tmp_path))
    first = claims.dense_model(cfg, "resnet20", 0)
    path = claims.dense_path(cfg, "resnet20", 0)
    stamp = path.stat().st_mtime_ns
    second = claims.dense_model(cfg, "resnet20", 0)
    assert len(calls) == 1 and path.stat().st_mtime_ns == stamp
    assert all(torch.equal(p, q) for p, q in zip(first.state_dict().values(), second.state_dict().values()))
    other = dataclasses.replace(cfg, dense_epochs=2)  # another config: another key, trained anew
    assert claims.dense_path(other, "resnet20", 0) != path
    claims.dense_model(other, "resnet20", 0)
    assert len(calls) == 2


def test_tiny_end_to_end_with_lr_selection_and_resume(tmp_path) -> None:
    cfg = dataclasses.replace(claims.ClaimsConfig(**TINY), claims=("gdp",), cache=str(tmp_path / "c"),
                              out=str(tmp_path / "claims"), batch_size=128)
    summary = claims.run_claims(cfg, progress=False)
    runs = json.loads((tmp_path / "claims.json").read_text())["runs"]
    assert len([r for r in runs if r["kind"] == "dense"]) == 2  # resnet20, 2 seeds
    for arm in ("l1", "gdp"):
        mine = [r for r in runs if r["arm"] == arm]
        assert sorted((r["seed"], r["lr"]) for r in mine if r["seed"] == 0) == [(0, 0.01), (0, 0.05)]
        chosen = claims.choose_lr(runs, arm, (0,), cfg.lrs)
        assert [r["lr"] for r in mine if r["seed"] == 1] == [chosen]  # the other seed runs the chosen rate only
        assert summary["arms"][arm]["lr"] == chosen and summary["arms"][arm]["seeds"] == [0, 1]
        assert len({r["epochs"]["total"] for r in mine}) == 1
        assert all(r["macs_fraction"] <= cfg.flops + 1e-9 and len(r["finetune_curve"]) == r["epochs"]["finetune"]
                   for r in mine)
    assert summary["claims"][0]["verdict"] in {"holds", "does not hold", "within noise"}
    assert "| gdp | l1 |" in (tmp_path / "claims.md").read_text()
    again = claims.run_claims(cfg, resume=True, progress=False)  # nothing left to run
    assert len(json.loads((tmp_path / "claims.json").read_text())["runs"]) == len(runs)
    assert again["claims"] == summary["claims"]


def test_tiny_no_retraining_claim(tmp_path) -> None:
    """functionality against l1 at l1's per-layer widths, before any fine-tune (test split, no rate)."""
    cfg = dataclasses.replace(claims.ClaimsConfig(**TINY), claims=("functionality",), cache=str(tmp_path / "c"),
                              out=str(tmp_path / "claims"))
    summary = claims.run_claims(cfg, progress=False)
    runs = {(r["arm"], r["seed"]): r for r in json.loads((tmp_path / "claims.json").read_text())["runs"]}
    assert runs["functionality-vgg8", 0]["lr"] is None and runs["functionality-vgg8", 0]["epochs"]["finetune"] == 0
    func = summary["arms"]["functionality-vgg8"]
    assert {"pruned", "pruned_bn"} <= set(func["stages"]) and func["stages_on"] == "test"
    assert [r["stage"] for r in summary["claims"]] == ["pruned", "pruned_bn"]
