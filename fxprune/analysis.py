"""analyze: fx.GraphModule -> ChannelGraph.

One small interpreter over the traced graph (compare torch/fx/passes/shape_prop.py): each node
maps its inputs' ChannelMaps to its output's, records which parameter dims hold which channels,
and unites the channel ids that ops couple. Ops it does not understand make the channels they
touch unprunable, with the node and op as the reason: conservative, never wrong.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import networkx as nx
import numpy as np
import torch
import torch.fx as fx
from torch.fx.node import map_aggregate

from fxprune import ops
from fxprune.errors import AnalysisError
from fxprune.ir import (
    ChannelGraph, ChannelGroup, ChannelMap, Layer, ParamSlice, Site, SliceSpec, UnitTable,
)
from fxprune.tracing import TensorMeta


def _meta(node: Any) -> Any:
    return node.meta.get("fxprune_value") if isinstance(node, fx.Node) else node


def _is_tensor(node: Any) -> bool:
    return isinstance(node, fx.Node) and isinstance(_meta(node), TensorMeta)


def _maps(struct: Any) -> list[ChannelMap]:
    out: list[ChannelMap] = []
    map_aggregate(struct, lambda v: out.append(v) if isinstance(v, ChannelMap) else None)
    return out


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


class _Analyzer:
    """Walks the graph once; see the module docstring."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.leaf_reasons: dict[str, str] = gm.meta.get("fxprune_leaf_modules", {})
        self.parent: list[int] = []
        self.space_of: list[int] = []
        self.spaces: list[str] = []
        self.blocked: dict[int, str] = {}
        self.param_slices: dict[tuple[str, int], ParamSlice] = {}
        self.layers: list[Layer] = []
        self.sites: list[tuple[str, int, np.ndarray]] = []
        self.env: dict[fx.Node, Any] = {}

    # ---- union-find over channel ids -------------------------------------------------
    def fresh(self, n: int, node: fx.Node) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        self.space_of.extend([len(self.spaces)] * n)
        self.spaces.append(node.name)
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def couple(self, a: np.ndarray, b: np.ndarray, where: str) -> None:
        """Unite a and b position by position; a tracked id meeting an untracked one is blocked."""
        for x, y in zip(a.ravel().tolist(), b.ravel().tolist()):
            if x >= 0 and y >= 0:
                self.union(x, y)
            elif x >= 0 or y >= 0:
                self.blocked.setdefault(max(x, y), f"coupled with untracked channels at {where}")

    def block(self, struct: Any, reason: str) -> None:
        for m in _maps(struct):
            for cid in m.ids.ravel().tolist():
                if cid >= 0:
                    self.blocked.setdefault(cid, reason)

    def bind(self, qualname: str, dim: int, ids: np.ndarray, where: str) -> None:
        """Record that dim ``dim`` of parameter/buffer ``qualname`` holds channels ``ids``."""
        key = (qualname, dim)
        if key in self.param_slices:
            old = self.param_slices[key]
            if old.ids.shape != ids.shape:
                self.block(ChannelMap((0,), ids), f"{qualname} used with another shape at {where}")
                self.block(ChannelMap((0,), old.ids), f"{qualname} used with another shape at {where}")
                return
            self.couple(old.ids, ids, where)
            return
        path, _, name = qualname.rpartition(".")
        self.param_slices[key] = ParamSlice(path, name, dim, ids.copy())

    # ---- the walk ------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                self.env[node] = None
            elif node.op == "output":
                self.block(self._input_struct(node), f"reaches the graph output ({node.name})")
            else:
                self.env[node] = self._run_op(node)

    def _input_struct(self, node: fx.Node) -> Any:
        return map_aggregate((node.args, node.kwargs), lambda a: self.env.get(a) if isinstance(a, fx.Node) else None)

    def _run_op(self, node: fx.Node) -> Any:
        handler = self._producer_handler(node)
        if handler is not None:
            return handler(node)
        if node.op == "call_function" and node.target is operator.getitem and not _is_tensor(node.args[0]):
            struct = self.env.get(node.args[0])
            if isinstance(struct, (tuple, list)):
                return struct[node.args[1]]
            return None
        inputs = self._input_struct(node)
        if not _maps(inputs):
            return None  # nothing tracked flows in: whatever the op is, its result cannot change
        handler = self._handler(node)
        if handler is None:
            reason = f"{ops.op_name(node)} at node '{node.name}' is not understood by the channel analysis"
            if node.op == "call_module":
                mod = self.modules[node.target]
                reason = f"opaque module '{node.target}' ({type(mod).__name__}) at node '{node.name}'"
                if node.target in self.leaf_reasons:
                    reason += f": it could not be traced ({self.leaf_reasons[node.target]})"
            self.block(inputs, reason)
            return None
        return handler(node)

    def _producer_handler(self, node: fx.Node) -> Callable[[fx.Node], Any] | None:
        if node.op == "call_module":
            mod = self.modules[node.target]
            if isinstance(mod, ops.CONV_MODULES + ops.CONV_TRANSPOSE_MODULES):
                return self._conv_module
            if isinstance(mod, torch.nn.Linear):
                return self._linear_module
        elif node.op == "call_function":
            if node.target in ops.CONV_FUNCTIONS:
                return self._conv_function
            if node.target in ops.LINEAR_FUNCTIONS:
                return self._linear_function
        return None

    def _handler(self, node: fx.Node) -> Callable[[fx.Node], Any] | None:
        t = node.target
        if node.op == "call_module":
            mod = self.modules[t]
            table = [
                (ops.BATCHNORM_MODULES, self._batchnorm_module),
                ((torch.nn.GroupNorm,), self._groupnorm),
                ((torch.nn.LayerNorm,), self._layernorm),
                ((torch.nn.PReLU,), self._prelu),
                (ops.UNARY_MODULES, self._unary),
                (ops.SPATIAL_MODULES, self._spatial),
                (ops.SOFTMAX_MODULES, self._softmax),
                (ops.MOVEMENT_MODULES, self._movement),
            ]
            return next((h for types, h in table if isinstance(mod, types)), None)
        if node.op == "call_method":
            table = [
                (ops.UNARY_METHODS, self._unary),
                (ops.ELEMENTWISE_METHODS, self._elementwise),
                (ops.MOVEMENT_METHODS, self._movement),
                (ops.REDUCTION_METHODS, self._reduction),
                (ops.SPLIT_METHODS, self._split),
                (ops.SOFTMAX_METHODS, self._softmax),
                (ops.QUERY_METHODS, lambda n: None),
            ]
            return next((h for names, h in table if t in names), None)
        table = [
            (ops.UNARY_FUNCTIONS, self._unary),
            (ops.SPATIAL_FUNCTIONS, self._spatial),
            (ops.ELEMENTWISE_FUNCTIONS, self._elementwise),
            (ops.MOVEMENT_FUNCTIONS, self._movement),
            (ops.REDUCTION_FUNCTIONS, self._reduction),
            (ops.CAT_FUNCTIONS, self._cat),
            (ops.SPLIT_FUNCTIONS, self._split),
            (ops.SOFTMAX_FUNCTIONS, self._softmax),
            (ops.BATCHNORM_FUNCTIONS, self._batchnorm_function),
            (ops.QUERY_FUNCTIONS, lambda n: None),
            ({torch.nn.functional.layer_norm}, self._layernorm),
            ({torch.nn.functional.group_norm}, self._groupnorm),
        ]
        return next((h for fns, h in table if t in fns), None)

    # ---- producers / consumers ---------------------------------------------------------------
    def _input_ids(self, node: fx.Node, x: fx.Node, dim: int) -> np.ndarray:
        xm = self.env.get(x)
        extent = _meta(x).shape[dim]
        if xm is None:
            return np.full(extent, -1, dtype=np.int64)
        if xm.dims != (dim,):
            self.block(xm, f"{ops.op_name(node)} at '{node.name}' reads channels laid out on dims {xm.dims}")
            return np.full(extent, -1, dtype=np.int64)
        return xm.ids

    def _conv(self, node: fx.Node, x: fx.Node, weight: str, bias: str | None, groups: int,
              transposed: bool, module_path: str | None, zero_padding: bool) -> ChannelMap:
        in_ids = self._input_ids(node, x, 1)
        out_shape = _meta(node).shape
        w_shape = self._param_shape(weight)
        out_ids = self.fresh(out_shape[1], node)
        where = f"conv '{node.name}'"
        if groups == 1:
            self.bind(weight, 0 if transposed else 1, in_ids, where)
            self.bind(weight, 1 if transposed else 0, out_ids, where)
        elif transposed:
            self.block(ChannelMap((1,), in_ids), f"grouped transposed conv '{node.name}'")
            self.block(ChannelMap((1,), out_ids), f"grouped transposed conv '{node.name}'")
        else:
            # A grouped conv keeps its group width: a whole conv group (its inputs and outputs)
            # is one unit, and dropping units lowers ``groups``.
            blocks = np.concatenate([in_ids.reshape(groups, -1), out_ids.reshape(groups, -1)], axis=1)
            self.couple(np.repeat(blocks[:, -out_ids.size // groups:][:, :1], blocks.shape[1], axis=1), blocks, where)
            self.bind(weight, 0, out_ids, where)
        if bias is not None:
            self.bind(bias, 0, out_ids, where)
        spatial = int(np.prod(_meta(x).shape[2:] if transposed else out_shape[2:]))
        self.layers.append(Layer(
            node=node.name, kind="conv_transpose" if transposed else "conv", module_path=module_path,
            weight=weight, bias=bias, in_ids=in_ids, out_ids=out_ids, groups=groups,
            in_per_group=len(in_ids) // groups,
            macs_per_pair=spatial * int(np.prod(w_shape[2:])), zero_padding=zero_padding,
        ))
        self.sites.append((node.name, 1, out_ids))
        return ChannelMap((1,), out_ids)

    def _param_shape(self, qualname: str) -> tuple[int, ...]:
        return tuple(self.gm.get_parameter(qualname).shape) if qualname else ()

    def _conv_module(self, node: fx.Node) -> ChannelMap:
        mod = self.modules[node.target]
        transposed = isinstance(mod, ops.CONV_TRANSPOSE_MODULES)
        pad = mod.padding if isinstance(mod.padding, (tuple, list)) else (mod.padding,)
        zero_padding = all(p == 0 for p in pad) if not isinstance(mod.padding, str) else mod.padding == "valid"
        return self._conv(
            node, node.args[0], f"{node.target}.weight",
            f"{node.target}.bias" if mod.bias is not None else None, mod.groups, transposed,
            node.target, zero_padding,
        )

    def _conv_function(self, node: fx.Node) -> Any:
        w, b = _arg(node, 1, "weight"), _arg(node, 2, "bias")
        groups = _arg(node, 6, "groups", 1)
        padding = _arg(node, 4, "padding", 0)
        ok = isinstance(w, fx.Node) and w.op == "get_attr" and (b is None or (isinstance(b, fx.Node) and b.op == "get_attr"))
        if not ok or not isinstance(groups, int):
            return self._opaque(node, "functional conv whose weight is not a parameter of the model")
        pads = padding if isinstance(padding, (tuple, list)) else (padding,)
        zero_padding = padding == "valid" or (not isinstance(padding, str) and all(p == 0 for p in pads))
        return self._conv(node, node.args[0], w.target, b.target if b is not None else None, groups, False, None, zero_padding)

    def _opaque(self, node: fx.Node, why: str) -> None:
        self.block(self._input_struct(node), f"{why} at node '{node.name}'")
        return None

    def _linear(self, node: fx.Node, x: fx.Node, weight: str, bias: str | None, module_path: str | None) -> ChannelMap:
        last = len(_meta(x).shape) - 1
        in_ids = self._input_ids(node, x, last)
        out_shape = _meta(node).shape
        out_ids = self.fresh(out_shape[-1], node)
        where = f"linear '{node.name}'"
        self.bind(weight, 1, in_ids, where)
        self.bind(weight, 0, out_ids, where)
        if bias is not None:
            self.bind(bias, 0, out_ids, where)
        self.layers.append(Layer(
            node=node.name, kind="linear", module_path=module_path, weight=weight, bias=bias,
            in_ids=in_ids, out_ids=out_ids, groups=1, in_per_group=len(in_ids),
            macs_per_pair=int(np.prod(out_shape[1:-1])), zero_padding=True,
        ))
        out_dim = len(out_shape) - 1
        self.sites.append((node.name, out_dim, out_ids))
        return ChannelMap((out_dim,), out_ids)

    def _linear_module(self, node: fx.Node) -> ChannelMap:
        mod = self.modules[node.target]
        bias = f"{node.target}.bias" if mod.bias is not None else None
        return self._linear(node, node.args[0], f"{node.target}.weight", bias, node.target)

    def _linear_function(self, node: fx.Node) -> Any:
        w, b = _arg(node, 1, "weight"), _arg(node, 2, "bias")
        if not (isinstance(w, fx.Node) and w.op == "get_attr") or (b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr")):
            return self._opaque(node, "functional linear whose weight is not a parameter of the model")
        return self._linear(node, node.args[0], w.target, b.target if b is not None else None, None)

    # ---- channel-preserving ops --------------------------------------------------------------
    def _channel_dim_map(self, node: fx.Node, x: fx.Node) -> ChannelMap | None:
        xm = self.env.get(x)
        if xm is not None and xm.dims != (1,):
            self.block(xm, f"{ops.op_name(node)} at '{node.name}' expects channels on dim 1, found dims {xm.dims}")
            return None
        return xm

    def _batchnorm_module(self, node: fx.Node) -> Any:
        xm = self._channel_dim_map(node, node.args[0])
        if xm is not None:
            mod = self.modules[node.target]
            for name in ("weight", "bias", "running_mean", "running_var"):
                if getattr(mod, name, None) is not None:
                    self.bind(f"{node.target}.{name}", 0, xm.ids, f"norm '{node.name}'")
        return xm

    def _batchnorm_function(self, node: fx.Node) -> Any:
        xm = self._channel_dim_map(node, node.args[0])
        if xm is None:
            return None
        for a in list(node.args[1:5]) + [node.kwargs.get(k) for k in ("running_mean", "running_var", "weight", "bias")]:
            if isinstance(a, fx.Node):
                if a.op != "get_attr":
                    return self._opaque(node, "functional norm with computed statistics")
                self.bind(a.target, 0, xm.ids, f"norm '{node.name}'")
        return xm

    def _groupnorm(self, node: fx.Node) -> Any:
        xm = self._channel_dim_map(node, node.args[0])
        if xm is None:
            return None
        if node.op == "call_module":
            mod = self.modules[node.target]
            num_groups = mod.num_groups
            params = [f"{node.target}.{n}" for n in ("weight", "bias") if getattr(mod, n) is not None]
        else:
            num_groups = _arg(node, 1, "num_groups")
            params = [a.target for a in (_arg(node, 2, "weight"), _arg(node, 3, "bias")) if isinstance(a, fx.Node)]
        # Statistics are per norm group: a whole norm group is one unit, dropping it lowers num_groups.
        per = len(xm.ids) // num_groups
        for k in range(num_groups):
            chunk = xm.ids[k * per:(k + 1) * per]
            self.couple(np.full(per, chunk[0]), chunk, f"group_norm '{node.name}'")
        for p in params:
            self.bind(p, 0, xm.ids, f"norm '{node.name}'")
        return xm

    def _layernorm(self, node: fx.Node) -> Any:
        xm = self.env.get(node.args[0])
        shape = _meta(node.args[0]).shape
        if node.op == "call_module":
            normalized = len(self.modules[node.target].normalized_shape)
        else:
            ns = _arg(node, 1, "normalized_shape")
            normalized = len(ns) if isinstance(ns, (tuple, list)) else 1
        if set(xm.dims) & set(range(len(shape) - normalized, len(shape))):
            self.block(xm, f"layer_norm at '{node.name}' normalizes over the channels (their statistics would change)")
        return xm

    def _prelu(self, node: fx.Node) -> Any:
        xm = self._channel_dim_map(node, node.args[0])
        if xm is not None and self.modules[node.target].num_parameters > 1:
            self.bind(f"{node.target}.weight", 0, xm.ids, f"prelu '{node.name}'")
        return xm

    def _unary(self, node: fx.Node) -> Any:
        x = node.args[0]
        xm = self.env.get(x)
        if _meta(node) is None or not isinstance(_meta(node), TensorMeta) or _meta(node).shape != _meta(x).shape:
            return self._opaque(node, f"{ops.op_name(node)} changes the shape")
        return xm

    def _spatial(self, node: fx.Node) -> Any:
        x = node.args[0]
        if node.target is torch.nn.functional.pad:
            pad = _arg(node, 1, "pad")
            if not isinstance(pad, (tuple, list)) or len(pad) // 2 > len(_meta(x).shape) - 2:
                return self._opaque(node, "pad along the channel dim")
        out = _meta(node)
        if not isinstance(out, TensorMeta) or len(out.shape) != len(_meta(x).shape) or out.shape[1] != _meta(x).shape[1]:
            return self._opaque(node, f"{ops.op_name(node)} with an unexpected output")
        return self._channel_dim_map(node, x)

    def _softmax(self, node: fx.Node) -> Any:
        xm = self.env.get(node.args[0])
        ndim = len(_meta(node.args[0]).shape)
        dim = self.modules[node.target].dim if node.op == "call_module" else _arg(node, 1, "dim")
        if dim is None or dim % ndim in xm.dims:
            self.block(xm, f"softmax at '{node.name}' normalizes over the channels")
        return xm

    def _reduction(self, node: fx.Node) -> Any:
        x = node.args[0]
        xm = self.env.get(x)
        ndim = len(_meta(x).shape)
        dim, keepdim = _arg(node, 1, "dim"), _arg(node, 2, "keepdim", False)
        if dim is None or not isinstance(_meta(node), TensorMeta):
            return self._opaque(node, f"{ops.op_name(node)} over all dims")
        reduced = {d % ndim for d in (dim if isinstance(dim, (tuple, list)) else (dim,))}
        if reduced & set(xm.dims):
            return self._opaque(node, f"{ops.op_name(node)} over the channel dim")
        dims = tuple(d if keepdim else d - sum(r < d for r in reduced) for d in xm.dims)
        return ChannelMap(dims, xm.ids)

    # ---- coupling ops ----------------------------------------------------------------------------
    def _couple_operands(self, node: fx.Node, operands: list[Any], out_ndim: int, out_shape: tuple[int, ...]) -> Any:
        """Element-wise coupling with broadcasting: mapped operands unite position by position."""
        mapped = [(o, self.env.get(o)) for o in operands if _is_tensor(o) and self.env.get(o) is not None]
        aligned = []
        for o, m in mapped:
            shift = out_ndim - len(_meta(o).shape)
            aligned.append((o, ChannelMap(tuple(d + shift for d in m.dims), m.ids)))
        dims = {m.dims for _, m in aligned}
        if len(dims) != 1:
            return self._opaque(node, f"{ops.op_name(node)} combines channels laid out on different dims {sorted(dims)}")
        (dims,) = dims
        full = tuple(out_shape[d] for d in dims)
        base = next((m for _, m in aligned if m.ids.shape == full), None)
        if base is None:
            return None  # only broadcast (size-1) channel maps: nothing couples
        where = f"{ops.op_name(node)} '{node.name}'"
        for _, m in aligned:
            if m is not base and m.ids.shape == full:
                self.couple(base.ids, m.ids, where)
        for o in operands:
            if not _is_tensor(o) or self.env.get(o) is not None:
                continue
            shape = _meta(o).shape
            shift = out_ndim - len(shape)
            extents = [shape[d - shift] if d - shift >= 0 else 1 for d in dims]
            if all(e == 1 for e in extents):
                continue  # broadcast along the channels
            if o.op == "get_attr" and len(dims) == 1:
                self.bind(o.target, dims[0] - shift, base.ids, where)
            else:
                self.block(base, f"{where} combines channels with untracked tensor '{o.name}'")
        return ChannelMap(dims, base.ids)

    def _elementwise(self, node: fx.Node) -> Any:
        out = _meta(node)
        operands = list(node.args) + [v for k, v in node.kwargs.items() if k in ("other", "input")]
        return self._couple_operands(node, operands, len(out.shape), out.shape)

    def _cat(self, node: fx.Node) -> Any:
        tensors = list(_arg(node, 0, "tensors"))
        out = _meta(node)
        dim = _arg(node, 1, "dim", 0) % len(out.shape)
        maps = [self.env.get(t) for t in tensors]
        if all(m is None or m.dims == (dim,) for m in maps):
            parts = [m.ids if m is not None else np.full(_meta(t).shape[dim], -1, np.int64) for t, m in zip(tensors, maps)]
            return ChannelMap((dim,), np.concatenate(parts))
        if any(m is not None and dim in m.dims for m in maps):
            return self._opaque(node, "cat mixing channel layouts")
        return self._couple_operands(node, tensors, len(out.shape), out.shape)

    def _split(self, node: fx.Node) -> Any:
        x = node.args[0]
        xm = self.env.get(x)
        ndim = len(_meta(x).shape)
        dim = _arg(node, 2, "dim", 0) % ndim
        outs = _meta(node)
        if not isinstance(outs, (tuple, list)):
            return self._opaque(node, "split with an unexpected result")
        if dim not in xm.dims:
            return tuple(xm for _ in outs)
        if xm.dims != (dim,):
            return self._opaque(node, "split of channels laid out on several dims")
        parts, start = [], 0
        for o in outs:
            n = o.shape[dim]
            parts.append(ChannelMap((dim,), xm.ids[start:start + n]))
            start += n
        return tuple(parts)

    # ---- data movement by label propagation -------------------------------------------------------
    def _movement(self, node: fx.Node) -> Any:
        x = node.args[0]
        xm = self.env.get(x)
        if xm is None:
            return self._opaque(node, f"{ops.op_name(node)} on a tracked operand that is not its first")
        shape = _meta(x).shape
        if not self._movement_is_safe(node, xm, len(shape)):
            return None
        labels = torch.arange(1, xm.ids.size + 1, dtype=torch.int64).reshape(xm.ids.shape)
        view = [shape[d] if d in xm.dims else 1 for d in range(len(shape))]
        label_tensor = labels.reshape(view).expand(shape).contiguous()
        out = self._apply_on(node, x, label_tensor)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != _meta(node).shape:
            return self._opaque(node, f"{ops.op_name(node)} whose result could not be followed")
        vary = tuple(d for d in range(out.dim()) if out.shape[d] > 1 and not bool((out == out.narrow(d, 0, 1)).all()))
        if not vary:
            return self._opaque(node, f"{ops.op_name(node)} selecting single channels")
        reduced = out
        for d in range(out.dim()):
            if d not in vary:
                reduced = reduced.narrow(d, 0, 1)
        if not bool((out == reduced).all()):
            return self._opaque(node, f"{ops.op_name(node)} mixing channels with other dims")
        table = np.concatenate([[-1], xm.ids.ravel()])
        ids = table[reduced.reshape([out.shape[d] for d in vary]).numpy()]
        if len(vary) > 1:
            self._couple_across(ids, f"{ops.op_name(node)} '{node.name}'")
        return ChannelMap(vary, ids)

    def _movement_is_safe(self, node: fx.Node, xm: ChannelMap, ndim: int) -> bool:
        """Reject movements that a smaller tensor would not reproduce (roll, indexing channels)."""
        if node.target in (torch.roll, "roll"):
            dims = _arg(node, 2, "dims", None)
            if dims is None or {d % ndim for d in (dims if isinstance(dims, (tuple, list)) else (dims,))} & set(xm.dims):
                self._opaque(node, "roll along the channels")
                return False
        if node.op == "call_function" and node.target is operator.getitem:
            for d, entry in _index_entries(node.args[1], ndim).items():
                if d in xm.dims and entry != slice(None) and not (
                    isinstance(entry, slice) and entry.step in (None, 1)
                    and all(isinstance(v, int) or v is None for v in (entry.start, entry.stop))
                ):
                    self._opaque(node, "indexing into the channels")
                    return False
        return True

    def _apply_on(self, node: fx.Node, x: fx.Node, label_tensor: torch.Tensor) -> Any:
        def concrete(a: Any) -> Any:
            if a is x:
                return label_tensor
            if isinstance(a, fx.Node):
                v = _meta(a)
                return torch.zeros(v.shape, dtype=v.dtype) if isinstance(v, TensorMeta) else v
            return a

        args = map_aggregate(node.args, concrete)
        kwargs = map_aggregate(node.kwargs, concrete)
        try:
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            if node.op == "call_module":
                return self.modules[node.target](*args, **kwargs)
            return node.target(*args, **kwargs)
        except Exception:  # noqa: BLE001 - an op that cannot run on labels is treated as opaque
            return None

    def _couple_across(self, ids: np.ndarray, where: str) -> None:
        """Channels spread over several dims: only one dim may shrink, the rest are tied.

        The kept dim is the one whose tying merges the fewest units that are still distinct (then
        the largest): a channel shuffle views, transposes and views back, and the second view
        must keep the dim the first one kept, or a 2 x 2 shuffle collapses into a single unit.
        """
        def cols(axis: int) -> np.ndarray:
            return np.moveaxis(ids, axis, -1).reshape(-1, ids.shape[axis])

        def merges(axis: int) -> int:
            c = cols(axis)
            return sum(len({self.find(v) if v >= 0 else -1 for v in c[:, j].tolist()}) - 1 for j in range(c.shape[1]))

        keep = min(range(ids.ndim), key=lambda a: (merges(a), -ids.shape[a], -a))
        c = cols(keep)
        for j in range(c.shape[1]):
            self.couple(np.full(c.shape[0], c[0, j]), c[:, j], where)

    # ---- results -------------------------------------------------------------------------------------
    def result(self) -> ChannelGraph:
        n = len(self.parent)
        roots = np.array([self.find(i) for i in range(n)], dtype=np.int64)
        space_of = np.array(self.space_of, dtype=np.int64)
        coupling = nx.Graph()
        coupling.add_nodes_from(range(len(self.spaces)))
        first_space: dict[int, int] = {}
        for cid in range(n):
            r, s = int(roots[cid]), int(space_of[cid])
            if first_space.setdefault(r, s) != s:
                coupling.add_edge(first_space[r], s)
        components = sorted((sorted(c) for c in nx.connected_components(coupling)), key=lambda c: c[0])
        group_of_space = np.empty(len(self.spaces), dtype=np.int64)
        for gid, comp in enumerate(components):
            group_of_space[comp] = gid
        group_of = group_of_space[space_of] if n else np.zeros(0, np.int64)
        unit_of = np.empty(n, dtype=np.int64)
        unit_index: dict[int, int] = {}
        sizes = [0] * len(components)
        for cid in range(n):
            r = int(roots[cid])
            if r not in unit_index:
                g = int(group_of[cid])
                unit_index[r] = sizes[g]
                sizes[g] += 1
            unit_of[cid] = unit_index[r]
        units = UnitTable(group_of, unit_of)
        reasons: dict[int, str] = {}
        for cid, why in sorted(self.blocked.items()):
            reasons.setdefault(int(group_of[cid]), why)
        groups = []
        for gid, comp in enumerate(components):
            reason = reasons.get(gid)
            if reason is None and sizes[gid] < 2:
                reason = "a single channel (a group never drops below one channel)"
            groups.append(ChannelGroup(gid, sizes[gid], reason is None, reason,
                                       spaces=[self.spaces[s] for s in comp]))
        for node, dim, ids in self.sites:
            g, u = units.lookup(ids)
            groups[int(g[0])].sites.append(Site(node, dim, u))
        for ps in self.param_slices.values():
            g, u = units.lookup(ps.ids)
            for gid in np.unique(g[g >= 0]).tolist():
                pos = np.nonzero(g == gid)[0]
                groups[gid].slices.append(SliceSpec(ps.module_path, ps.param, ps.dim, pos, u[pos]))
        coupling = nx.relabel_nodes(coupling, {i: s for i, s in enumerate(self.spaces)})
        node_maps = {n.name: v for n, v in self.env.items() if v is not None}
        return ChannelGraph(groups, units, self.layers, self.param_slices, node_maps, coupling, reasons)


def _index_entries(index: Any, ndim: int) -> dict[int, Any]:
    """Which input dim each entry of a ``tensor[index]`` applies to (None adds no input dim)."""
    index = index if isinstance(index, tuple) else (index,)
    consumed = sum(1 for e in index if e is not None and e is not Ellipsis)
    out, d = {}, 0
    for e in index:
        if e is Ellipsis:
            d += ndim - consumed
        elif e is None:
            continue
        else:
            out[d] = e
            d += 1
    return out


def analyze(gm: fx.GraphModule) -> ChannelGraph:
    """Find the channel groups of a traced module (see ``fxprune.trace``)."""
    if not isinstance(gm, fx.GraphModule) or not any("fxprune_value" in n.meta for n in gm.graph.nodes):
        raise AnalysisError("fxprune.analyze expects the GraphModule returned by fxprune.trace(model, example_inputs)")
    analyzer = _Analyzer(gm)
    analyzer.run()
    return analyzer.result()
