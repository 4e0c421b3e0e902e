"""passes.constants: the per-channel constants finalize reads off the graph instead of recording.

Each known value is checked against the gated module's real value at that node (run node by
node): the removed channel must hold exactly that constant everywhere. Unknown is always allowed;
a wrong known value is the bug these tests look for.
"""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import fxprune
from fxprune.passes import FinalizeReport, finalize, insert_gates
from fxprune.passes.constants import channel_constants

from helpers import assert_constants_hold

finalize_module = importlib.import_module("fxprune.passes.finalize")


def gated_with_half_gates(model: nn.Module, x: torch.Tensor, seed: int = 0):
    gm = fxprune.trace(model, (x,))
    cg = fxprune.analyze(gm)
    gated, gates = insert_gates(gm, cg)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for gate in gates.values():
            n = gate.weight.numel()
            v = torch.as_tensor(rng.uniform(0.25, 1.75, n), dtype=torch.float32)
            v[torch.as_tensor(rng.permutation(n)[: n // 2])] = 0.0
            gate.weight.copy_(v)
    return gated, cg


def _bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


class DenseLike(nn.Module):
    """Pre-activation BN after a concat: removed channels reach the next conv as BN's shift."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.norm, self.conv = _bn(10), nn.Conv2d(10, 5, 1)

    def forward(self, x):
        return self.conv(F.relu(self.norm(torch.cat([self.a(x), self.b(x)], 1))))


class Pads(nn.Module):
    """A zero pad keeps a zero channel zero but not a non-zero constant one (the border is 0); a
    pad with fill 1 and a softmax over space keep neither."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 6, 3), _bn(6)  # gated after the BN: removed channels are 0
        self.stem2, self.bn2 = nn.Conv2d(3, 6, 3), _bn(6)  # gated before it: they carry BN's shift
        self.zero, self.one, self.soft = nn.Conv2d(6, 4, 3), nn.Conv2d(6, 4, 3), nn.Conv2d(6, 4, 1)
        self.shifted = nn.Conv2d(6, 4, 3)

    def forward(self, x):
        h = F.relu(self.bn(self.stem(x)))
        k = self.bn2(F.relu(self.stem2(x)))
        z = self.zero(F.pad(h, [1, 1, 1, 1]))
        o = self.one(F.pad(h, [1, 1, 1, 1], value=1.0))
        s = self.soft(torch.softmax(h.flatten(2), -1).view_as(h))
        c = self.shifted(F.pad(k, [1, 1, 1, 1]))
        return z.sum() + o.sum() + s.sum() + c.sum()


def test_known_constants_are_the_gated_values():
    torch.manual_seed(0)
    model, x = DenseLike().eval(), torch.randn(1, 3, 8, 8)
    gated, cg = gated_with_half_gates(model, x)
    assert assert_constants_hold(gated, cg, x) > 0
    known = channel_constants(gated, cg)
    relu = next(n.name for n in gated.graph.nodes if n.target is F.relu)
    c = known[relu]
    norm = model.norm
    shift = F.relu(norm.bias - norm.running_mean * norm.weight / torch.sqrt(norm.running_var + norm.eps)).detach()
    removed = ~c.isnan()
    assert removed.sum() == 5  # half of each concatenated group
    assert torch.allclose(c[removed], shift[removed], atol=1e-6)


def test_padding_with_a_fill_and_softmax_are_not_known():
    torch.manual_seed(0)
    model, x = Pads().eval(), torch.randn(1, 3, 10, 10)
    gated, cg = gated_with_half_gates(model, x)
    assert_constants_hold(gated, cg, x)
    known = channel_constants(gated, cg)
    zero_pad, one_pad, shifted_pad = [n for n in gated.graph.nodes if n.target is F.pad]
    assert zero_pad.name in known and one_pad.name not in known and shifted_pad.name not in known
    assert shifted_pad.args[0].name in known  # the BN shift itself is known
    assert not any(n.name in known for n in gated.graph.nodes if n.target is torch.softmax)
    # The shifted channels reach ``shifted`` as BN's shift inside a zero border: not a constant,
    # though the recorded corner value is 0. Finalize must keep them (once it dropped them).
    report = FinalizeReport()
    finalize(gated, cg, report=report)
    assert any("shifted" in why for why in report.retained.values())


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet_b0", "densenet121"])
def test_torchvision_consumers_need_no_recording(name):
    """On these models every consumer's removed inputs are known (densenet121: all but its
    classifier, behind an average pool of a non-zero constant), the values hold, and finalize
    still reproduces the gated model."""
    torch.manual_seed(0)
    model, x = getattr(torchvision.models, name)(weights=None).eval(), torch.randn(1, 3, 64, 64)
    gated, cg = gated_with_half_gates(model, x)
    assert_constants_hold(gated, cg, x)
    held = finalize_module.read_gates(gated, cg)
    keep = {gid: m.copy() for gid, m in held.keep.items()}
    work = finalize_module._folded_copy(gated, held.scale)
    taps, known = finalize_module._taps(gated, work, cg, keep, [])
    unknown = set(taps) - set(known)
    assert len(unknown) <= (1 if name == "densenet121" else 0), unknown
    assert taps
    finalize(gated, cg)  # raises EquivalenceError if a known value were wrong
