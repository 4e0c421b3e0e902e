"""Pruning methods, each a set of hooks over the shared channel graph (see base.Method)."""
from __future__ import annotations

from fxprune.errors import ConfigError
from fxprune.passes.methods.base import Method
from fxprune.passes.methods.gdp import GDP
from fxprune.passes.methods.l1 import L1Norm

METHODS: dict[str, type[Method]] = {"l1": L1Norm, "gdp": GDP}


def get_method(method: str | Method, **options) -> Method:
    """A method instance from its name (``"l1"``, ``"gdp"``) or an instance."""
    if isinstance(method, Method):
        return method
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; available: {sorted(METHODS)}")
    try:
        return METHODS[method](**options)
    except TypeError as exc:
        raise ConfigError(f"bad options for method {method!r}: {exc}") from exc


__all__ = ["Method", "METHODS", "get_method", "GDP", "L1Norm"]
