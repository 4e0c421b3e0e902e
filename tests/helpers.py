"""Helpers shared by test modules: a hand-written training loop over ``fxprune.prepare`` and the
resume check every method with state must pass."""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn as nn


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
