"""Copies of a GraphModule that share tensors instead of duplicating them.

Passes copy the module they transform so that their input stays as it was, but most tensors are
never written: gates only add modules, finalize replaces the tensors it changes with new ones.
Sharing the rest (and the copy-on-write copy ``trace`` makes of the user's model) keeps the
user's, traced, gated and finalized modules together within about one parameter-size above the
user's model (0.4-1.0 P on the torchvision zoo; DESIGN: the user's model is never mutated; ours
are never mutated in place).

Copies are also cheap in time: modules are cloned shallowly (new attribute dicts, same tensors)
rather than deep-copied (``fxprune.modcopy.clone_tree``), and no copy generates its code before
it is first run (``fxprune.lazycode``): generating Python for a graph of thousands of nodes costs
about as much as running the model, and a pass edits its working copy's graph first.
"""
from __future__ import annotations

import copy
from typing import Any, Collection

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.node import map_arg

from fxprune.lazycode import lazy_graph_module
from fxprune.modcopy import clone_tree, lazy_clone


def structural_copy(gm: fx.GraphModule, bypass: Collection[fx.Node] = ()) -> fx.GraphModule:
    """A working copy of ``gm``: its own graph and modules, ``gm``'s parameters and buffers.

    Nodes in ``bypass`` are left out of the copy's graph, a use of one reading the node's first
    argument instead (a gate's input): a pass that drops such nodes does not create them only to
    erase them. The copy writes its code when first run; call ``materialize`` before handing it
    out."""
    # gm's module tree already has the shape GraphModule.__init__ builds from a graph (plain
    # modules on the paths to its targets), so the clone is installed as it is and the graph set
    # afterwards: building from a graph walks every target's path with Module.__setattr__ and
    # creates each intermediate module anew (a sixth of a forward per copy on mobilenet_v2).
    out = lazy_graph_module(nn.Module(), fx.Graph(), gm.__class__.__name__)
    memo: dict[int, Any] = {}
    for name, child in gm.named_children():
        out._modules[name] = clone_tree(child, memo=memo)
    out._parameters = dict(gm._parameters)
    out._buffers = dict(gm._buffers)
    for node in gm.graph.nodes:  # plain tensor attributes (fx's constants) referenced by get_attr
        if node.op == "get_attr" and "." not in node.target and not hasattr(out, node.target):
            value = getattr(gm, node.target)
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                out.register_buffer(node.target, value)  # as GraphModule.__init__ installs it
            else:
                setattr(out, node.target, value)
    out.graph = _graph_copy(gm.graph, bypass)
    out._tracer_cls = gm._tracer_cls
    out.meta = dict(gm.meta)
    out.training = gm.training
    return out


def _graph_copy(graph: fx.Graph, bypass: Collection[fx.Node] = ()) -> fx.Graph:
    """``copy.deepcopy(graph)`` without the ``bypass`` nodes (one that is used must have a node as
    its first argument, else the lookup of its replacement fails loudly). Each node is created
    without arguments and given them afterwards: ``Graph.create_node`` scans the arguments of a
    new node for symbolic ints (pytree), about 40% of a copy's time, and a traced graph has none."""
    out = fx.Graph(tracer_cls=graph._tracer_cls)
    out._codegen = copy.deepcopy(graph._codegen)  # as Graph.__deepcopy__ does
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node in bypass:
            if node.args and isinstance(node.args[0], fx.Node):
                env[node] = env[node.args[0]]
            continue
        new = out.create_node(node.op, node.target, (), {}, node.name, node.type)
        if node.args:
            new.args = map_arg(node.args, env.__getitem__)
        if node.kwargs:
            new.kwargs = map_arg(node.kwargs, env.__getitem__)
        new.meta = copy.copy(node.meta)
        env[node] = new
    return out


def materialize(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` ready to hand out: submodules its graph no longer references are dropped, and its
    code is (re)written from the edited graph when it is first run."""
    _drop_unused_modules(gm)
    gm.recompile()
    return gm


def _drop_unused_modules(gm: fx.GraphModule) -> None:
    """``GraphModule.delete_all_unused_submodules`` in one walk of the tree (it walks the subtree
    of every called module, a sixth of a forward on mobilenet_v2): a submodule stays if the
    graph calls it or a module under it, or reads an attribute under it."""
    used: set[str] = set()
    called: set[str] = set()
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr") and isinstance(node.target, str):
            if node.op == "call_module":
                called.add(node.target)
            path = node.target
            while path and path not in used:  # a path in ``used`` has its prefixes there too
                used.add(path)
                path = path.rpartition(".")[0]

    def prune(module: nn.Module, prefix: str) -> None:
        for name, child in list(module._modules.items()):
            path = prefix + name
            if child is None or path in called:  # a called module keeps everything under it
                continue
            if path in used:
                prune(child, path + ".")
            else:
                delattr(module, name)

    prune(gm, "")


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
    training one never changes the other (copy-on-write: memory is shared until one is written)."""
    shared = {id(t) for t in list(old.parameters()) + list(old.buffers())}
    clones: dict[int, torch.Tensor] = {}
    for mod in new.modules():
        for table in (mod._parameters, mod._buffers):
            for name, t in list(table.items()):
                if t is not None and id(t) in shared:
                    if id(t) not in clones:
                        clone = lazy_clone(t)
                        clones[id(t)] = nn.Parameter(clone, t.requires_grad) if isinstance(t, nn.Parameter) else clone
                    table[name] = clones[id(t)]
