"""Helpers shared by test modules: a hand-written training loop over ``fxprune.prepare``, the
resume check every method with state must pass, and the check of finalize's per-channel
constants against the values a gated module really computes."""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn

from fxprune.passes.constants import channel_constants


def run_steps(prepared, batches, opt) -> None:
    """The training loop a user writes around ``fxprune.prepare`` (every hook in its place)."""
    for x, y in batches:
        loss = nn.functional.cross_entropy(prepared.module(x), y) + prepared.loss()
        opt.zero_grad()
        loss.backward()
        prepared.after_backward()
        opt.step()
        prepared.step(opt)


def resumed_equals_uninterrupted(setup: Callable, batches: list, cut: int):
    """Train ``setup()`` on all batches; train another to ``cut``, save, load into a third and
    finish. Asserts the module states are equal and returns (uninterrupted, resumed)."""
    a, opt_a = setup()
    run_steps(a, batches, opt_a)
    b, opt_b = setup()
    run_steps(b, batches[:cut], opt_b)
    state, opt_state = copy.deepcopy(b.state_dict()), copy.deepcopy(opt_b.state_dict())
    c, opt_c = setup()
    c.load_state_dict(state)
    opt_c.load_state_dict(opt_state)
    run_steps(c, batches[cut:], opt_c)
    for (k, va), vc in zip(a.module.state_dict().items(), c.module.state_dict().values()):
        assert torch.equal(va, vc), k
    return a, c


class _Values(fx.Interpreter):
    """Every tensor value of a run, by node name."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.values[n.name] = out.detach().clone()
        return out


def assert_constants_hold(gated: fx.GraphModule, cg, x: torch.Tensor) -> int:
    """Every known value is what the gated module computes there, at every element; returns how
    many positions were known."""
    known = channel_constants(gated, cg)
    run = _Values(gated)
    with torch.no_grad():
        run.run(x)
    count = 0
    for name, c in known.items():
        v = run.values[name]
        assert v.shape[1] == c.numel(), name
        for k in torch.nonzero(~c.isnan()).flatten().tolist():
            actual = v.select(1, k)
            assert torch.allclose(actual, torch.full_like(actual, float(c[k])), rtol=1e-5, atol=1e-6), (name, k)
            count += 1
    return count
