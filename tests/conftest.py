"""Fixtures shared by test modules."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from fxprune.backends.runners import torch_threads


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread for a module: on a shared 2-core machine, two OpenMP threads competing
    with other processes made the ResNet-20 training test 6x slower (77 s vs 13 s) and densenet
    export ~10x slower."""
    with torch_threads(1):
        yield
