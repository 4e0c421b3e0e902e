"""Your model and data through the CLI (issue 15): an ImageFolder written from the digits images,
a model factory from your own module, timm by name, and a checkpoint to start from."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from fxprune.flow.cli import main as cli

FACTORY = '''
import torch.nn as nn

def make(num_classes):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))
'''


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Three digit classes as PNG files in ImageFolder layout."""
    root = tmp_path_factory.mktemp("digits-folder")
    digits = load_digits()
    for label in (0, 1, 2):
        images = digits.images[digits.target == label]
        for split, chosen in (("train", images[:24]), ("val", images[24:32])):
            (root / split / f"class{label}").mkdir(parents=True)
            for i, img in enumerate(chosen):
                Image.fromarray((img * 255 / 16).astype(np.uint8)).save(root / split / f"class{label}" / f"{i}.png")
    return root


@pytest.fixture()
def own_module(tmp_path, monkeypatch) -> str:
    (tmp_path / "my_models.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_models:make"


def _run(tmp_path: Path, *args: str) -> int:
    return cli(["compile", "--method", "l1", "--flops", "0.5", "--epochs", "1", "--finetune-epochs", "0",
                "--image-size", "16", "--workers", "0", "--batch-size", "16", "--no-progress",
                "--out", str(tmp_path / "run"), *args])


def test_own_model_own_images_and_a_checkpoint(tmp_path, folder, own_module):
    import my_models

    trained = my_models.make(3)
    with torch.no_grad():
        trained[0].weight.mul_(3.0)  # recognisably not a fresh initialisation
    torch.save(trained.state_dict(), tmp_path / "ckpt.pt")
    assert _run(tmp_path, "--model", own_module, "--dataset", str(folder), "--checkpoint", str(tmp_path / "ckpt.pt")) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["dense"]["params"] == sum(p.numel() for p in trained.parameters())  # 3 classes, from the folder
    assert report["pruned"]["flops"] <= report["target"]["flops"]
    assert report["accuracy"]["input"] is not None


def test_timm_model_by_name(tmp_path, folder):
    pytest.importorskip("timm")
    assert _run(tmp_path, "--model", "timm:resnet10t", "--dataset", str(folder)) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["groups"][-1]["size"] == 3  # the classifier has the folder's three classes
    assert report["pruned"]["flops"] <= report["target"]["flops"] < report["dense"]["flops"]
    assert (tmp_path / "run" / "model.fxprune").is_file()


@pytest.mark.parametrize("args, phrase", [
    (["--model", "no_such_module:make"], "cannot import 'make' from 'no_such_module'"),
    (["--model", "timm:no_such_net"], "timm.list_models()"),
    (["--dataset", "/nonexistent-folder"], "ImageFolder"),
    (["--checkpoint", "/nonexistent.pt"], "no such file"),
])
def test_clear_errors_for_models_data_and_checkpoints_that_cannot_be_used(tmp_path, capsys, args, phrase):
    assert _run(tmp_path, *args) == 2
    assert phrase in capsys.readouterr().err


def test_a_checkpoint_of_another_model_is_refused(tmp_path, folder, own_module):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    assert _run(tmp_path, "--model", own_module, "--dataset", str(folder), "--checkpoint", str(tmp_path / "other.pt")) == 2
