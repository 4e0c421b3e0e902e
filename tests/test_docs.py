"""The runnable examples in the passes' and core modules' docstrings run and print what they say."""
from __future__ import annotations

import doctest
import importlib

import pytest

from fxprune.rules.base import REGISTRY

MODULES = ["fxprune.tracing", "fxprune.analysis", "fxprune.scores", "fxprune.rules.base", "fxprune.passes.finalize"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    before = dict(REGISTRY.modules)
    try:
        result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    finally:  # the rules example registers a layer of its own
        REGISTRY.modules.clear()
        REGISTRY.modules.update(before)
    assert result.attempted > 0 and result.failed == 0
