"""BatchNorm re-estimation (``fxprune.passes.reestimate``) and compile's ``bn_recalibration``."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.errors import ConfigError
from fxprune.passes import reestimate


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU(),
                         nn.Conv2d(4, 3, 1), nn.BatchNorm2d(3))


def _batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 2, 7, 7, generator=g) * (1 + i) + i, torch.zeros(5, dtype=torch.long)) for i in range(n)]


def test_statistics_are_the_cumulative_average_of_the_batches_read():
    net, data = _net().eval(), _batches(6)
    report = reestimate(net, data, batches=4)
    assert (report.norms, report.batches) == (2, 4)
    # by hand: the first norm's input per batch, its mean and unbiased variance averaged over the 4 batches
    feats = [net[0](x) for x, _ in data[:4]]
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.transpose(0, 1).reshape(4, -1).var(1, unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(net[1].running_mean, mean.detach())
    torch.testing.assert_close(net[1].running_var, var.detach())
    assert net[1].momentum == 0.3 and not net.training and not any(m.training for m in net.modules())


def test_failed_batch_restores_the_old_statistics():
    net = _net().eval()
    before = net[1].running_mean.clone(), net[1].running_var.clone()
    bad = _batches(2) + [("not a batch",)]
    with pytest.raises(ConfigError):
        reestimate(net, bad, batches=3)
    torch.testing.assert_close(net[1].running_mean, before[0])
    torch.testing.assert_close(net[1].running_var, before[1])
    assert net[1].momentum == 0.3


@pytest.mark.parametrize("batches", [0, -1, 1.5, True])
def test_bad_batch_counts_are_refused(batches):
    with pytest.raises(ConfigError, match="batches"):
        reestimate(_net(), _batches(2), batches=batches)


def test_no_batch_read_is_an_error():
    with pytest.raises(ConfigError, match="no batch"):
        reestimate(_net(), [], batches=3)


def test_compile_reports_accuracy_before_fine_tune_raw_and_reestimated():
    torch.manual_seed(0)
    from fxprune.data import digits_loaders
    from fxprune.models import build_model
    data = digits_loaders(image_size=16, batch_size=64, seed=0)
    model = build_model("resnet20", num_classes=10, in_channels=data.input_shape[0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = fxprune.compile(model, "l1", fxprune.Budget(flops=0.5), data.example_inputs(), train_loader=data.train,
                             eval_loader=data.test, epochs=2, bn_recalibration=8, progress=False)
    acc = result.report.accuracy
    assert acc["pruned_bn"] is not None and acc["pruned"] is not None
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in result.model.modules())
    assert result.report.bn_recalibration == {"norms": norms, "batches": 8} and norms > 0
    assert acc["pruned_bn"] > acc["pruned"]  # the stale dense statistics are what the raw pruned model suffers from
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the user's model untouched
    with pytest.raises(ConfigError, match="bn_recalibration"):
        fxprune.compile(model, "l1", fxprune.Budget(flops=0.5), data.example_inputs(), bn_recalibration=4,
                        progress=False)
