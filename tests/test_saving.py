"""fxprune.save / fxprune.load: a pruned model kept as its record and weights, rebuilt in a new
process from the user's dense model code (issue 15, "keep the result without pickling code")."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

import fxprune
import fxprune.passes
from fxprune.errors import ConfigError

X = (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)


def test_round_trip_in_a_new_process(tmp_path):
    """Only torchvision (the user's model code) and fxprune are imported where it is loaded."""
    torch.manual_seed(0)
    dense = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    result = fxprune.compile(dense, "l1", fxprune.Budget(flops=0.4), X, progress=False)
    fxprune.save(result.model, tmp_path / "pruned.fxprune")
    probe = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.save({"x": probe, "y": result.model.eval()(probe).detach()}, tmp_path / "probe.pt")
    script = textwrap.dedent(f"""
        import torch, torchvision, fxprune
        model = torchvision.models.resnet18(weights=None, num_classes=10)   # fresh dense weights
        pruned = fxprune.load(model, {str(tmp_path / 'pruned.fxprune')!r}, (torch.randn(5, 3, 32, 32),))
        probe = torch.load({str(tmp_path / 'probe.pt')!r})
        with torch.no_grad():
            print(float((pruned(probe["x"]) - probe["y"]).abs().max()))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-5


def test_folded_scales_and_removed_units_survive_the_round_trip(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    gm = fxprune.trace(net, X)
    cg = fxprune.analyze(gm)
    keep = {g.id: np.arange(g.size) % 3 != 0 for g in cg.prunable_groups}
    scale = {g.id: torch.linspace(0.5, 1.5, g.size) for g in cg.prunable_groups}
    pruned = fxprune.passes.finalize(gm, cg, fxprune.Decision(keep, scale))
    fxprune.save(pruned, tmp_path / "p.fxprune")
    rebuilt = fxprune.load(nn.Sequential(*[type(m)(*_args(m)) for m in net]), tmp_path / "p.fxprune", X)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(X[0]), pruned.eval()(X[0]))
    assert rebuilt.get_submodule("3").out_channels == pruned.get_submodule("3").out_channels < 8


def _args(m: nn.Module) -> tuple:
    """Constructor arguments of the layers above (a fresh dense copy of the same architecture)."""
    if isinstance(m, nn.Conv2d):
        return m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding
    if isinstance(m, nn.BatchNorm2d):
        return (m.num_features,)
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    if isinstance(m, nn.AdaptiveAvgPool2d):
        return (m.output_size,)
    return ()


def test_a_changed_architecture_or_input_size_is_refused(tmp_path):
    dense = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    fxprune.save(fxprune.compile(dense, "l1", fxprune.Budget(flops=0.5), X, progress=False), tmp_path / "r.fxprune")
    with pytest.raises(ConfigError, match="architecture or the input size changed"):
        fxprune.load(torchvision.models.resnet34(weights=None, num_classes=10), tmp_path / "r.fxprune", X)
    with pytest.raises(ConfigError, match="architecture or the input size changed"):
        fxprune.load(torchvision.models.resnet18(weights=None, num_classes=10), tmp_path / "r.fxprune",
                     (torch.randn(2, 3, 64, 64),))


def test_save_and_load_refuse_what_they_cannot_use(tmp_path):
    with pytest.raises(ConfigError, match="without a pruning record"):
        fxprune.save(nn.Linear(2, 2), tmp_path / "x.fxprune")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(ConfigError, match="not a file fxprune.save wrote"):
        fxprune.load(nn.Linear(2, 2), tmp_path / "plain.pt", (torch.randn(1, 2),))
    with pytest.raises(ConfigError, match="no file"):
        fxprune.load(nn.Linear(2, 2), tmp_path / "missing.fxprune", (torch.randn(1, 2),))
