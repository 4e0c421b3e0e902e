"""Copies of a GraphModule that share tensors instead of duplicating them.

Passes copy the module they transform so that their input stays as it was, but most tensors are
never written: gates only add modules, finalize replaces the tensors it changes with new ones.
Sharing the rest keeps the traced, gated and finalized modules together within about twice the
parameter bytes (DESIGN: the user's model is never mutated; ours are never mutated in place).

Copies are also cheap in time: modules are cloned shallowly (new attribute dicts, same tensors)
rather than deep-copied (``fxprune.modcopy.clone_tree``), and a working copy generates no code
until it is materialized: generating Python for a graph of thousands of nodes costs about as
much as running the model.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from fxprune.modcopy import clone_tree

try:  # lazy code generation; a private torch module, so fall back to plain GraphModules
    from torch.fx._lazy_graph_module import _LazyGraphModule, _make_graph_module
except ImportError:  # pragma: no cover
    _LazyGraphModule = None


def _lazy_graph_module(root: nn.Module, graph: fx.Graph, class_name: str) -> fx.GraphModule:
    """``fx.GraphModule(root, graph, class_name)`` that writes its code at its first call, not
    now: a pass edits its working copy's graph before the code matters. Hand it out only after
    ``materialize`` (a lazy module re-enters ``__call__`` on its first run)."""
    if _LazyGraphModule is None:  # pragma: no cover
        return fx.GraphModule(root, graph, class_name)
    return _make_graph_module(root, graph, class_name, graph_module_cls=_LazyGraphModule)


def structural_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A working copy of ``gm``: its own graph and modules, ``gm``'s parameters and buffers.

    The copy generates its code lazily (call ``materialize`` before handing it out)."""
    root = nn.Module()
    memo: dict[int, Any] = {}
    for name, child in gm.named_children():
        root._modules[name] = clone_tree(child, memo=memo)
    root._parameters = dict(gm._parameters)
    root._buffers = dict(gm._buffers)
    for node in gm.graph.nodes:  # plain tensor attributes (fx's constants) referenced by get_attr
        if node.op == "get_attr" and "." not in node.target and not hasattr(root, node.target):
            setattr(root, node.target, getattr(gm, node.target))
    out = _lazy_graph_module(root, copy.deepcopy(gm.graph), gm.__class__.__name__)
    out.meta = dict(gm.meta)
    out.training = gm.training
    return out


def materialize(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` ready to hand out: submodules its graph no longer references are dropped and its
    code is written now. A lazy module writes its code inside its first call and then calls
    itself again, so a forward hook on it would fire twice."""
    gm.delete_all_unused_submodules()
    realize = getattr(gm, "real_recompile", None)
    (realize or gm.recompile)()
    return gm


def get_tensor(module: nn.Module, qualname: str) -> torch.Tensor:
    """The parameter or buffer ``qualname`` of ``module``."""
    path, _, name = qualname.rpartition(".")
    return getattr(module.get_submodule(path), name)


def set_tensor(owner: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put ``value`` at ``owner.name``, never writing the old tensor (it may be shared); a
    parameter stays a parameter with its ``requires_grad``."""
    old = getattr(owner, name)
    setattr(owner, name, nn.Parameter(value, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else value)


def replace_tensor(module: nn.Module, qualname: str, value: torch.Tensor) -> None:
    """``set_tensor`` by qualified name."""
    path, _, name = qualname.rpartition(".")
    set_tensor(module.get_submodule(path), name, value)


def unshare(new: torch.nn.Module, old: torch.nn.Module) -> None:
    """Clone every parameter/buffer of ``new`` that is still an object of ``old``, so that
    training one never changes the other."""
    shared = {id(t) for t in list(old.parameters()) + list(old.buffers())}
    clones: dict[int, torch.Tensor] = {}
    for mod in new.modules():
        for table in (mod._parameters, mod._buffers):
            for name, t in list(table.items()):
                if t is not None and id(t) in shared:
                    if id(t) not in clones:
                        clone = t.detach().clone()
                        clones[id(t)] = nn.Parameter(clone, t.requires_grad) if isinstance(t, nn.Parameter) else clone
                    table[name] = clones[id(t)]
