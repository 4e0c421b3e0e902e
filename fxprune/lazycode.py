"""GraphModules that write their Python code when it is first needed, not when they are built.

Generating and compiling the code of a graph costs about 40 us per node (on mobilenet_v2 about
half an eager forward of the model), and many modules fxprune builds are never run: the traced
module is only read by the analysis and copied by ``insert_gates``. torch's ``_LazyGraphModule``
defers the work to the first call, but that first call runs ``__call__`` twice (its placeholder
forward writes the code, then calls the module again), so a hook the user put on the module
fires twice. Here the placeholder is a descriptor instead: reading ``module.forward`` (which
``__call__``, ``inspect.signature`` and tracers all do) writes the code and returns the real
forward, so nothing runs twice and nothing sees a placeholder signature.

    >>> import torch, torch.fx as fx
    >>> gm = lazy_graph_module(torch.nn.Module(), fx.symbolic_trace(lambda x: x + 1).graph, "Add")
    >>> gm.has_code()
    False
    >>> gm(torch.ones(1)), gm.has_code()
    (tensor([2.]), True)
"""
from __future__ import annotations

from typing import Any

import torch.fx as fx
import torch.nn as nn

try:  # a private torch module: without it every GraphModule writes its code when built
    from torch.fx._lazy_graph_module import _LazyGraphModule, _make_graph_module
except ImportError:  # pragma: no cover
    _LazyGraphModule = None


class _WriteCodeOnRead:
    """``forward`` of a module whose code is not written yet: reading it writes the code (which
    replaces this descriptor on the module's own class) and returns the real forward."""

    def __get__(self, obj: Any, cls: type) -> Any:
        if obj is None:
            return self
        obj.real_recompile()
        return type(obj).forward.__get__(obj, cls)


if _LazyGraphModule is not None:
    class LazyGraphModule(_LazyGraphModule):
        """A GraphModule whose code is written at the first read of ``forward``."""

        _lazy_forward = forward = _WriteCodeOnRead()  # type: ignore[assignment]

        def has_code(self) -> bool:
            return not self._needs_recompile()
else:  # pragma: no cover
    class LazyGraphModule(fx.GraphModule):  # type: ignore[no-redef]
        def has_code(self) -> bool:
            return True


def lazy_graph_module(root: nn.Module, graph: fx.Graph, class_name: str) -> fx.GraphModule:
    """``fx.GraphModule(root, graph, class_name)`` that writes its code when ``forward`` is
    first read (a call, a signature, a trace) or ``.code`` is; editing its graph afterwards needs
    ``recompile()`` as for any GraphModule."""
    if _LazyGraphModule is None:  # pragma: no cover
        return LazyGraphModule(root, graph, class_name)
    return _make_graph_module(root, graph, class_name, graph_module_cls=LazyGraphModule)
