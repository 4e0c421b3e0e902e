"""Issue 11: pruning without retraining — functionality-oriented filter pruning, compensation of
the consumers of removed channels, and LOP fine-tuning through ``compile``."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import fxprune
import fxprune.passes
from fxprune.errors import ConfigError


def duplicated_net() -> nn.Module:
    """conv(3 -> 8) whose filters 4..7 (and their BatchNorm) copy filters 0..3 exactly."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 2.0)
        for name in ("weight", "bias"):
            getattr(net[0], name)[4:] = getattr(net[0], name)[:4]
            getattr(net[1], name)[4:] = getattr(net[1], name)[:4]
        net[1].running_mean[4:] = net[1].running_mean[:4]
        net[1].running_var[4:] = net[1].running_var[:4]
    return net.eval()


def calib(n: int = 64, seed: int = 1) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)),
                      batch_size=16)


X = (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)),)


def _group_of(result, module: str) -> int:
    return next(g["id"] for g in result.report.groups if any(p.startswith(f"_{module}") for p in g["producers"]))


@pytest.mark.parametrize("representation", ["sample", "class"])
def test_functionality_finds_planted_duplicates(representation):
    net = duplicated_net()
    # the budget that removes four of the first conv's eight filters (the second group stays whole)
    dense = fxprune.count_macs(net, X)
    per_filter = 8 * 8 * (3 * 9 + 6 * 9)
    budget = fxprune.Budget(flops=(dense - 4 * per_filter) / dense)
    result = fxprune.compile(net, "functionality", budget, X, calib_loader=calib(), progress=False,
                             method_options={"representation": representation})
    keep = result.prepared.decision.keep[_group_of(result, "0")]
    assert keep.sum() == 4
    assert all(keep[i] != keep[i + 4] for i in range(4)), keep  # one of each identical pair
    assert result.report.pruned["flops"] <= result.report.target["flops"]
    assert result.report.method_report["calibration"]["forward_passes"] == 4


def test_functionality_meets_the_budget_exactly_with_every_representation():
    torch.manual_seed(0)
    net = duplicated_net()
    for representation in ("sample", "class", "ascent"):
        result = fxprune.compile(net, "functionality", fxprune.Budget(flops=0.6), X, calib_loader=calib(),
                                 progress=False, method_options={"representation": representation,
                                                                 "ascent_steps": 5})
        r = result.report
        assert r.pruned["flops"] <= r.target["flops"]
        assert r.equivalence["max_rel_diff"] < 1e-4
    assert r.method_report["calibration"]["ascent_steps"] > 0


def test_compensation_is_exact_when_removed_filters_copy_kept_ones():
    """Removing the four copies and refitting the next conv gives back the dense function on
    data it was not fitted on (ridge 0: the least-squares problem is exactly determined)."""
    net = duplicated_net()
    gm = fxprune.trace(net, X)
    cg = fxprune.analyze(gm)
    first = next(g for g in cg.prunable_groups if g.size == 8)
    keep = {first.id: np.arange(8) < 4}
    gated = fxprune.passes.apply_decision(gm, cg, fxprune.Decision(keep))
    fixed, report = fxprune.passes.compensate(gated, gm, cg, keep, calib(), ridge=0.0)
    pruned = fxprune.passes.finalize(fixed, cg)
    fresh = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(pruned(fresh), net(fresh), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(gated(fresh), net(fresh), atol=1e-3)  # without it, the function changes
    assert report.used and report.layers["_3"]["status"] == "fitted"
    assert pruned.get_submodule("3").in_channels == 4


def test_compensation_never_increases_calibration_error():
    torch.manual_seed(0)
    net = duplicated_net()
    with torch.no_grad():  # break the duplicates: nothing here is exact
        net[0].weight.add_(0.3 * torch.randn_like(net[0].weight))
    for flops in (0.8, 0.5):
        result = fxprune.compile(net, "l1", fxprune.Budget(flops=flops), X, calib_loader=calib(), progress=False,
                                 compensate=True)
        comp = result.report.compensation
        fitted = [v for v in comp["layers"].values() if "error_after" in v]
        assert fitted and all(v["error_after"] <= v["error_before"] for v in fitted)
        assert comp["used"] == (comp["output_error"]["with"] <= comp["output_error"]["without"])
        if comp["used"]:
            assert comp["output_error"]["with"] < comp["output_error"]["without"]
        # finalize checked the pruned model against the compensated one
        assert result.report.equivalence["max_rel_diff"] < 1e-4


def test_compensation_needs_data_and_functionality_names_what_it_reads():
    net = duplicated_net()
    with pytest.raises(ConfigError, match="calib_loader"):
        fxprune.compile(net, "l1", fxprune.Budget(flops=0.5), X, compensate=True, progress=False)
    with pytest.raises(ConfigError, match="representation"):
        fxprune.compile(net, "functionality", fxprune.Budget(flops=0.5), X, progress=False,
                        method_options={"representation": "sample"})
    with pytest.raises(ConfigError, match="representation"):
        fxprune.get_method("functionality", representation="pixels")


def test_lop_fine_tune_collapses_back_to_the_pruned_shape():
    torch.manual_seed(0)
    net = duplicated_net().train()
    result = fxprune.compile(net, "l1", fxprune.Budget(flops=0.5), X, train_loader=calib(), finetune_epochs=1,
                             progress=False, finetune_lop=True)
    plain = fxprune.compile(net, "l1", fxprune.Budget(flops=0.5), X, progress=False)
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(result.model) == shapes(plain.model)
    assert any(e["phase"] == "finetune" for e in result.report.epochs)
    assert not torch.equal(result.model.get_parameter("3.weight"), plain.model.get_parameter("3.weight"))
    assert "fxprune_record" in result.model.meta  # the collapsed model can still be saved
    with pytest.raises(ConfigError, match="finetune_epochs > 0"):
        fxprune.compile(net, "l1", fxprune.Budget(flops=0.5), X, progress=False, finetune_lop=True)
