"""The finalize equivalence check: real divergence raises and names the node; float32 rounding
that the model itself amplifies is told apart from a finalize bug by re-running in float64."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxprune
from fxprune.passes import finalize, insert_gates
from fxprune.passes.verify import check_equivalence


class _Net(nn.Module):
    def __init__(self, chaos: float = 0.0):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 1)
        self.chaos = chaos

    def forward(self, x):
        h = self.conv2(torch.relu(self.bn1(self.conv1(x))))
        # sin(k h) turns float32 rounding of h (1e-7 relative) into O(0.1) output changes when k ~ 1e6
        return torch.sin(self.chaos * h) if self.chaos else h


def _gated(chaos: float):
    torch.manual_seed(0)
    model = _Net(chaos).eval()
    x = torch.randn(2, 3, 8, 8)
    gm = fxprune.trace(model, (x,))
    cg = fxprune.analyze(gm)
    gated, gates = insert_gates(gm, cg)
    with torch.no_grad():
        for gate in gates.values():
            gate.weight.copy_(torch.linspace(0.3, 1.7, gate.weight.numel()))
            gate.weight[::2] = 0.0
    return gated, cg, x


def test_divergence_raises_with_first_node_and_float64_measure():
    gated, cg, x = _gated(0.0)
    fin = finalize(gated, cg)
    broken = copy.deepcopy(fin)
    with torch.no_grad():
        broken.conv2.weight[0] += 0.5
    with pytest.raises(fxprune.EquivalenceError, match=r"first diverging node: conv2.*") as info:
        check_equivalence(gated, broken, (x,))
    assert "float64" in str(info.value) and info.value.max_abs_diff > 0


def test_float32_amplified_rounding_passes_with_a_warning():
    gated, cg, x = _gated(1e6)
    with torch.no_grad():
        out32 = gated(x)
        exact = copy.deepcopy(gated).double()(x.double())
    assert (out32.double() - exact).abs().max() / exact.abs().max() > 1e-4  # the model itself is that noisy
    with pytest.warns(fxprune.FxpruneWarning, match="float64"):
        fin = finalize(gated, cg)
    assert sum(p.numel() for p in fin.parameters()) < sum(p.numel() for p in gated.parameters())
