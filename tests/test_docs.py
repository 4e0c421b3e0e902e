"""The runnable examples in the passes' and core modules' docstrings run and print what they say."""
from __future__ import annotations

import doctest
import importlib

import pytest

from fxprune.rules.base import REGISTRY

MODULES = ["fxprune.tracing", "fxprune.analysis", "fxprune.scores", "fxprune.rules.base", "fxprune.passes.finalize",
           "fxprune.passes.compensate", "fxprune.passes.lop", "fxprune.passes.masks", "fxprune.lpnet",
           "fxprune.passes.constants", "fxprune.passes.verify", "fxprune.lazycode", "fxprune.gcpause", "fxprune.schedules",
           "fxprune.passes.bnstats", "fxprune.rules.einsum"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    before = dict(REGISTRY.modules)
    try:
        result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    finally:  # the rules example registers a layer of its own
        REGISTRY.modules.clear()
        REGISTRY.modules.update(before)
    assert result.attempted > 0 and result.failed == 0


def _public_functions():
    import inspect

    import fxprune
    import fxprune.backends as backends
    import fxprune.budget as budget
    import fxprune.data as data
    import fxprune.models as models
    import fxprune.passes as passes
    import fxprune.rules as rules
    import fxprune.scores as scores
    import fxprune.sparsity as sparsity
    import fxprune.train as train

    listed = [(fxprune, fxprune.__all__), (passes, passes.__all__), (backends, backends.__all__),
              (scores, [n for n in vars(scores) if getattr(vars(scores)[n], "__module__", "") == scores.__name__]),
              (rules, ["per_channel", "elementwise", "register_op"]), (budget, ["allocate"]),
              (train, ["train", "evaluate"]), (data, ["digits_loaders"]), (models, ["build_model"]),
              (sparsity, [n for n in vars(sparsity) if getattr(vars(sparsity)[n], "__module__", "") == sparsity.__name__])]
    return [(f"{mod.__name__}.{n}", getattr(mod, n)) for mod, names in listed for n in names
            if not n.startswith("_") and inspect.isfunction(getattr(mod, n))]


@pytest.mark.parametrize("name, function", _public_functions(), ids=lambda v: v if isinstance(v, str) else "")
def test_public_functions_list_the_errors_they_raise(name, function):
    """Issue 14: every public function's docstring says what it raises (or that it raises nothing)."""
    import fxprune.errors

    doc = function.__doc__ or ""
    assert "Raises" in doc, f"{name}: no 'Raises ...' in its docstring"
    named = {n for n in vars(fxprune.errors) if n.endswith(("Error", "Unavailable"))}
    assert "Raises nothing" in doc or any(n in doc for n in named), f"{name}: its Raises names no fxprune error"
