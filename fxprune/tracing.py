"""trace: nn.Module -> fx.GraphModule, captured with concrete shapes.

Real models branch on shapes (``if h % 32: raise``, ``B, C, H, W = x.shape``, an anchor cache
keyed on ``x.shape``), split tensors into Python lists (``list(t.chunk(2, 1))``) and take
``*args``/``**kwargs``. All of that is fixed once the example inputs are known, so fxprune
traces with them: every proxy carries the concrete value of its node, computed as the node is
created by running the op on its arguments' values (a leaf module is called). Python then
sees real shapes:

* shape-derived values (``.shape``, ``.size()``, ``.dim()``, ``len()``, ``numel`` and
  arithmetic/comparisons on them) are *untainted*: ``bool()``, ``int()``, ``__index__``,
  ``len()`` return their concrete value, so shape control flow is specialised (the branch not
  taken is simply absent); sizes used as arguments stay nodes (``getattr(x, "shape")`` +
  ``getitem`` feeding a ``view``), so a pruned model still reads them at run time;
* anything that depends on tensor *values* (a tensor, ``.item()``, ``.tolist()``, comparisons
  of tensors) is *tainted*: control flow on it raises, and the submodule becomes an opaque leaf
  (listed with its reason in ``gm.meta["fxprune_leaf_modules"]``), or, at the root,
  ``fxprune.TraceError``;
* iterating a proxy whose value is a tuple/list/tensor yields ``getitem`` proxies, so
  unpacking, ``list(...)`` and for-loops work;
* ``*args``/``**kwargs`` and keyword-only parameters of the root forward are bound
  concretely (the extra example inputs, else empty / their defaults); example inputs map to
  the positional parameters in order, and non-tensor ones are specialised;
* functions that do not dispatch on proxies are stood in for while tracing (``_patches``):
  ``torch.jit.isinstance`` answers for a proxy's value, ``torch.tensor`` / ``torch.as_tensor``
  of sizes become nodes, and ``np.array(x.shape)`` converts a shape-derived value concretely.

Values are tensors computed under ``no_grad``, with one exception: convolutions and linear
layers (exact types) are not computed. Their output is zeros of the right shape and strides,
the shape computed from the layer's hyper-parameters (a meta-tensor run where that formula
does not apply). Such a value is right in shape only (``fake``), and so is everything computed
from it, so the layers that usually follow need not run either: a BatchNorm, activation or
dropout layer given a fake value passes it on as its output, a pooling layer yields zeros of
its output's shape (adaptive pooling from its output size: its meta run costs ten times its
real run on small inputs), and a conv -> BN -> activation chain costs no FLOPs. At 224x224
the trace costs resnet50 0.2 forwards (1.3 computing every value), densenet121 0.7 (1.8),
mobilenet_v2 1.7 and efficientnet_b0 1.8 (2.4 and 2.6 computing all but the convs and
linears), on one thread. Shapes, control flow and the graph stay exact as long as no op could
read a fake value's contents into a shape.
So a fake value may only flow into ops that have an op rule (element-wise, norms, pooling,
data movement, ...), as floating-point data (not an index, a size, a mask or a scalar), not
written into a real tensor and not turned into Python data; anything else (``nonzero``, an
opaque leaf, an op without a rule) abandons that trace, and the model is traced again with
every value computed, on a fresh copy. Fake tensors (``FakeTensorMode``) were measured as the
alternative for every op (torch 2.14, one CPU thread): they spend no FLOPs but about 1 ms of
Python per op, which made capture slower for every torchvision model tried at 64x64 and for
mobilenet_v2, densenet121, convnext_tiny and efficientnet_b0 at 224x224 (1.4-3x); only
resnet50 at 224x224 gained (134 vs 203 ms). Leaves run in eval mode, so BatchNorm statistics
never move; the graph itself is recorded in the model's own train/eval
mode, as plain fx does. Each node gets ``meta["fxprune_value"]``: a ``TensorMeta`` per tensor,
other values (ints, ``torch.Size``, slices) as they are, so no separate forward is needed.

Example (in the manner of ``torch/fx/passes/shape_prop.py``)::

    >>> import torch, fxprune
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    ...     def forward(self, x, *args, **kwargs):
    ...         b, c, h, w = x.shape
    ...         if h % 8 != 0:
    ...             raise ValueError("height must be divisible by 8")
    ...         return self.conv(x).view(b, 8, h * w)
    >>> gm = fxprune.trace(Net(), (torch.randn(1, 3, 16, 16),))
    >>> [n.meta["fxprune_value"] for n in gm.graph.nodes if n.op != "output"][-1]
    TensorMeta(shape=(1, 8, 256), dtype=torch.float32)
    >>> [n.name for n in gm.graph.nodes]
    ['x', 'getattr_1', 'getitem', 'getitem_2', 'getitem_3', 'conv', 'mul', 'view', 'output']
"""
from __future__ import annotations

import builtins
import inspect
import operator
import sys
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx._symbolic_trace import _orig_module_call
from torch.fx.node import map_aggregate

from fxprune import checks
from fxprune.errors import FxpruneWarning, TraceError
from fxprune.gcpause import gc_paused
from fxprune.lazycode import lazy_graph_module
from fxprune.modcopy import copy_module
from fxprune.rules.base import function_target, is_registered_module, rule_for

# Modules that stay leaves so that their train/eval behaviour survives tracing.
_KEEP_AS_LEAF: tuple[type, ...] = ()
try:  # torchvision's StochasticDepth branches on self.training in Python.
    from torchvision.ops import StochasticDepth

    _KEEP_AS_LEAF = (StochasticDepth,)
except ImportError:  # pragma: no cover - torchvision is a dependency
    pass

# Queries whose result depends on a tensor's metadata only, never on its values.
_SHAPE_METHODS = {
    "size", "dim", "ndimension", "numel", "nelement", "get_device", "is_floating_point",
    "is_complex", "is_contiguous", "element_size", "stride", "type",
}
_SHAPE_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda", "layout", "requires_grad", "is_quantized"}
_SHAPE_FUNCTIONS = {len, torch.numel}

# Functional ops whose training flag would update running statistics while values are computed:
# op -> (the flag, the statistics it would update). Without statistics (weight standardization:
# ``F.batch_norm(w, None, None, training=True)``) the flag only says to use the batch's own.
_EVAL_ARGUMENT: dict[Callable[..., Any], tuple[str, str]] = {F.batch_norm: ("training", "running_mean")}


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of a tensor value seen while tracing."""

    shape: tuple[int, ...]
    dtype: torch.dtype


# Both signals below are BaseExceptions: a model's own ``except Exception`` around the
# offending code must not swallow them, or the graph would silently take the other path.
class DataDependentControlFlow(BaseException):
    """Python control flow (bool, int, iteration) on a value computed from tensor values."""


class _RunFailed(BaseException):
    """An op failed on the example values: the inputs do not fit the model (never a leaf)."""


class _NeedValues(BaseException):
    """A value the trace did not compute reached an op whose result could depend on it."""


# Layers whose output the trace does not compute, only its shape: what the trace's values are
# for (see the module docstring). Exact types: a subclass may compute anything in its forward.
_SHAPE_ONLY_LAYERS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)
# Given a value that is only right in shape, these need not run either (see _shape_only_output).
_BATCH_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
_SHAPE_PRESERVING = (*_BATCH_NORMS, torch.nn.ReLU, torch.nn.ReLU6, torch.nn.SiLU, torch.nn.Hardswish,
                     torch.nn.Hardsigmoid, torch.nn.Sigmoid, torch.nn.Tanh, torch.nn.GELU, torch.nn.LeakyReLU,
                     torch.nn.ELU, torch.nn.Mish, torch.nn.Identity, torch.nn.Dropout, torch.nn.Dropout2d)
_POOLS = (torch.nn.MaxPool1d, torch.nn.MaxPool2d, torch.nn.MaxPool3d, torch.nn.AvgPool1d, torch.nn.AvgPool2d,
          torch.nn.AvgPool3d)
_ADAPTIVE_POOLS = {torch.nn.AdaptiveAvgPool1d: 1, torch.nn.AdaptiveAvgPool2d: 2, torch.nn.AdaptiveAvgPool3d: 3}
_IN_PLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (list, tuple)):
        return any(_has_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_has_tensor(v) for v in value.values())
    return False


def _meta_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return TensorMeta(tuple(value.shape), value.dtype)
    return value


def _value_meta(value: Any) -> Any:
    """What ``node.meta["fxprune_value"]`` keeps of a value: tensors become TensorMeta."""
    return value if isinstance(value, torch.Size) else map_aggregate(value, _meta_of)


class ConcreteProxy(fx.Proxy):
    """A proxy that knows the concrete value of its node (``value``) and whether that value
    was computed from tensor values (``tainted``), which decides what Python may branch on.
    ``fake``: the value has the right shape but not the right contents (it descends from a
    layer the trace did not compute, see ``_shape_only_output``)."""

    value: Any
    tainted: bool
    fake: bool = False

    def __getattr__(self, k: str) -> ConcreteAttribute:
        if k.startswith("__") and k.endswith("__"):  # a protocol probe (numpy's __array_interface__,
            raise AttributeError(k)  # torch.tensor's __cuda_array_interface__), not a tensor attribute
        return ConcreteAttribute(self, k)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """``np.array(x.shape)``: a shape-derived value converts to its concrete numpy array;
        tensor values are refused (``DataDependentControlFlow``, so a submodule becomes a leaf)."""
        return np.asarray(self._python_value("a numpy conversion"), dtype=dtype)

    def _python_value(self, what: str) -> Any:
        """The value for a Python protocol (bool, int, ...); refused if it depends on tensor values."""
        if self.tainted or isinstance(self.value, torch.Tensor):
            raise DataDependentControlFlow(
                f"{what} of node '{self.node.name}' needs a tensor value; Python control flow may "
                "depend on shapes only"
            )
        return self.value

    def __bool__(self) -> bool:
        if isinstance(self.value, (list, tuple, dict)):  # emptiness is structure, not data
            return bool(self.value)
        return bool(self._python_value("bool()"))

    def __int__(self) -> int:
        return int(self._python_value("int()"))

    def __index__(self) -> int:
        return operator.index(self._python_value("an index"))

    def __float__(self) -> float:
        return float(self._python_value("float()"))

    def __len__(self) -> int:
        return len(self.value)  # a length is structure (dim 0 of a tensor), never data

    def __iter__(self) -> Iterator[ConcreteProxy]:
        value = self.value
        if isinstance(value, dict):
            return iter(list(value))
        if not isinstance(value, (list, tuple, torch.Tensor)):
            raise TypeError(f"'{type(value).__name__}' value of '{self.node.name}' is not iterable")
        return (self[i] for i in range(len(value)))

    def keys(self) -> Any:
        if isinstance(self.value, dict):
            return list(self.value)
        return ConcreteAttribute(self, "keys")()


class ConcreteAttribute(ConcreteProxy):
    """``proxy.attr``: a method call (no node of its own) or, once used as a value, a
    ``getattr`` node (mirrors ``torch.fx.proxy.Attribute``)."""

    def __init__(self, root: ConcreteProxy, attr: str):
        self.root, self.attr, self.tracer = root, attr, root.tracer
        self._proxy: ConcreteProxy | None = None

    def _materialize(self) -> ConcreteProxy:
        if self._proxy is None:
            self._proxy = self.tracer.create_proxy("call_function", builtins.getattr, (self.root, self.attr), {})
        return self._proxy

    @property
    def node(self) -> fx.Node:  # type: ignore[override]
        return self._materialize().node

    @property
    def value(self) -> Any:  # type: ignore[override]
        return self._materialize().value

    @property
    def tainted(self) -> bool:  # type: ignore[override]
        return self._materialize().tainted

    @property
    def fake(self) -> bool:  # type: ignore[override]
        return self._materialize().fake

    def __call__(self, *args: Any, **kwargs: Any) -> ConcreteProxy:
        return self.tracer.create_proxy("call_method", self.attr, (self.root,) + args, kwargs)


def _value_of(a: Any) -> Any:
    return a.value if isinstance(a, ConcreteProxy) else a


def _is_shape_query(kind: str, target: Any, args: tuple[Any, ...]) -> bool:
    if kind == "call_method":
        return target in _SHAPE_METHODS
    if kind == "call_function":
        if target is builtins.getattr:
            return args[1] in _SHAPE_ATTRS
        return target in _SHAPE_FUNCTIONS
    return False


_FUNCTION_APPLY = torch.autograd.Function.__dict__["apply"]  # a classmethod (C or Python)
_TENSOR_FACTORIES = {"tensor": torch.tensor, "as_tensor": torch.as_tensor}
_JIT_ISINSTANCE = torch.jit.isinstance


def _patches(tracer: ConcreteTracer) -> dict[tuple[Any, str], Any]:
    """Functions that do not dispatch on proxies, replaced while tracing (owner, name -> stand-in):

    - ``torch.autograd.Function.apply``: a custom Function given a proxy becomes one opaque node;

    - ``torch.tensor(size)`` / ``torch.as_tensor``: C functions that read their data's
      contents, which a proxy does not have; given a proxy (``x.shape[-2:]``, a list of sizes)
      they become a node of their own, so the traced model still reads the sizes at run time
      (so do ``einops.rearrange`` / ``reduce`` called as module attributes; imported by name, fx's
      ``autowrap_functions`` records them, ``_autowrapped``);
    - ``torch.jit.isinstance(x, T)``: decided on the proxy's concrete value (a U-Net's skip
      connection asking whether ``x`` is a tensor must hear yes; a proxy is not a Tensor)."""
    def factory(fn: Callable[..., Any]) -> Callable[..., Any]:
        def make(data: Any, *args: Any, **kwargs: Any) -> Any:
            if any(isinstance(a, ConcreteProxy) for a in _flat((data, args, kwargs))):
                return tracer.create_proxy("call_function", fn, (data, *args), kwargs)
            return fn(data, *args, **kwargs)
        return make

    def jit_isinstance(obj: Any, target_type: Any) -> bool:
        return _JIT_ISINSTANCE(map_aggregate(obj, _value_of), target_type)

    def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
        if any(isinstance(a, fx.Proxy) for a in _flat((args, kwargs))):
            # one opaque node: its backward stays the Function's own (rules.function_target)
            return tracer.create_proxy("call_function", function_target(cls), args, kwargs)
        return _FUNCTION_APPLY.__get__(None, cls)(*args, **kwargs)

    einops = {(sys.modules["einops"], fn.__name__): factory(fn) for fn in _autowrapped()}  # einops.rearrange(...)
    return {**{(torch, name): factory(fn) for name, fn in _TENSOR_FACTORIES.items()},
            (torch.jit, "isinstance"): jit_isinstance, (torch.autograd.Function, "apply"): classmethod(apply),
            **einops}


def _autowrapped() -> tuple[Callable[..., Any], ...]:
    """Library functions recorded as one node each wherever a forward calls them (fx's
    ``autowrap_functions``): einops' ``rearrange`` / ``reduce`` do not know a proxy, and their
    pattern is what the channel analysis follows (``rules.rearrange``). Only if the model's code
    has imported einops."""
    einops = sys.modules.get("einops")
    return (einops.rearrange, einops.reduce) if einops is not None and hasattr(einops, "rearrange") else ()


class _ModuleState:
    """Python-level state of every module, so that what a forward stores while being traced
    (caches holding proxies: ``self.anchors = ...``, ``self.grid[i] = ...``) can be undone.

    Attributes are saved one level deep: the attribute dict, and the contents of the plain
    lists and dicts it holds (parameters, buffers, children, list caches), restored in place.
    """

    def __init__(self, root: torch.nn.Module):
        self.saved = {
            m: (dict(m.__dict__), [(v, type(v)(v)) for v in m.__dict__.values() if type(v) in (list, dict)])
            for m in root.modules()
        }

    def restore(self, module: torch.nn.Module) -> None:
        if module not in self.saved:
            return
        attrs, containers = self.saved[module]
        module.__dict__.clear()
        module.__dict__.update(attrs)
        for live, saved in containers:
            live.clear()
            if isinstance(live, dict):
                live.update(saved)
            else:
                live.extend(saved)
        for child in module._modules.values():
            if child is not None:
                self.restore(child)


class ConcreteTracer(fx.Tracer):
    """Traces with the example inputs' values riding on the proxies (see the module docstring).

    A submodule whose forward fails to trace becomes a leaf: the nodes it recorded are erased,
    its Python state is restored, and ``leaves`` says why.
    """

    def __init__(self, example_inputs: Sequence[Any], shape_only: bool = False):
        super().__init__(autowrap_functions=_autowrapped())
        self.example_inputs = tuple(example_inputs)
        self.leaves: dict[str, str] = {}
        self.shape_nodes: set[fx.Node] = set()
        self.shape_only = shape_only  # convs and linears yield zeros of their output's shape
        self.need_values: str | None = None  # why a shape-only trace does not stand
        self._modules: dict[str, torch.nn.Module] | None = None
        self._made_fake = False
        self._evaluating = False
        self._param_cache: dict[str, fx.Proxy] = {}
        self._state: _ModuleState | None = None

    # ---- the root's arguments -------------------------------------------------------------
    def create_args_for_root(self, root_fn: Callable[..., Any], is_module: bool,
                             concrete_args: Any = None) -> tuple[Callable[..., Any], list[Any]]:
        """Bind the example inputs to the forward's parameters: tensors become placeholders,
        everything else (non-tensor inputs, defaults, ``*args``/``**kwargs``) is concrete."""
        params = list(inspect.signature(inspect.unwrap(root_fn)).parameters.values())[1:]
        inputs = list(self.example_inputs)
        call_args: list[Any] = [self.root]
        call_kwargs: dict[str, Any] = {}
        for p in params:
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                if inputs:
                    call_args.append(self._input(p.name, inputs.pop(0)))
                elif p.default is not p.empty:
                    call_args.append(p.default)
                else:
                    raise TraceError(
                        f"{type(self.root).__name__}.forward needs an example input for parameter "
                        f"'{p.name}': pass one tensor per positional parameter in example_inputs"
                    )
            elif p.kind is p.VAR_POSITIONAL:
                call_args.extend(self._input(f"{p.name}_{i}", v) for i, v in enumerate(inputs))
                inputs = []
            elif p.kind is p.KEYWORD_ONLY:
                if p.default is p.empty:
                    raise TraceError(
                        f"{type(self.root).__name__}.forward has the keyword-only parameter "
                        f"'{p.name}' without a default: fxprune passes example inputs positionally"
                    )
                call_kwargs[p.name] = p.default
        if inputs:
            raise TraceError(
                f"{len(self.example_inputs)} example inputs for {type(self.root).__name__}.forward, "
                f"which takes {len(self.example_inputs) - len(inputs)} positional arguments"
            )
        return lambda: root_fn(*call_args, **call_kwargs), []

    def _input(self, name: str, value: Any) -> Any:
        """A placeholder for an example input; a non-tensor one is specialised (the placeholder
        keeps the call signature and defaults to the value)."""
        if _has_tensor(value):  # a clone: in-place ops of the model must not reach the user's tensors
            value = map_aggregate(value, lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v)
            return self._placeholder(name, (), value)
        literal = value is None or isinstance(value, (bool, int, float, str))
        self._placeholder(name, (value,) if literal else (), value)
        return value

    def _placeholder(self, name: str, default: tuple[Any, ...], value: Any) -> ConcreteProxy:
        proxy = super().create_proxy("placeholder", name, default, {})
        return self._record(proxy, value, tainted=True)

    # ---- values ------------------------------------------------------------------------------
    def create_proxy(self, kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                     name: str | None = None, type_expr: Any = None,
                     proxy_factory_fn: Callable[[fx.Node], fx.Proxy] | None = None) -> ConcreteProxy:
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        proxies = [a for a in _flat((args, kwargs)) if isinstance(a, ConcreteProxy)]
        shape_query = _is_shape_query(kind, target, args)
        fake_input = not shape_query and any(a.fake for a in proxies)
        if fake_input:
            self._check_shape_only(proxy.node, kind, target, args, kwargs)
        self._made_fake = False
        value = self._compute(kind, target, args, kwargs, fake_input)
        if fake_input and not all(isinstance(v, torch.Tensor) for v in _flat(value)):
            self._refuse(proxy.node, "turns a value into Python data")
        tainted = not shape_query and any(a.tainted or _has_tensor(a.value) for a in proxies)
        return self._record(proxy, value, tainted, fake=fake_input or self._made_fake)

    # ---- shape-only layers -------------------------------------------------------------------
    def _check_shape_only(self, node: fx.Node, kind: str, target: Any, args: tuple[Any, ...],
                          kwargs: dict[str, Any]) -> None:
        """A value that is only right in shape may flow into ``node`` if the op's result shape
        cannot depend on its contents: an op with a rule (element-wise, norms, pooling, data
        movement, ...) reading it as floating-point data, not as an index, size or mask, and
        not writing it into a real tensor."""
        if self._modules is None:
            self._modules = dict(self.root.named_modules())
        if rule_for(node, self._modules) is None:
            self._refuse(node, "has no op rule")
        first = args[0] if args else None
        for a in _flat((args, kwargs)):  # the operand acted on may be anything (a tuple to index)
            if isinstance(a, ConcreteProxy) and a.fake and a is not first and not (
                    isinstance(a.value, torch.Tensor) and a.value.is_floating_point() and a.value.dim()):
                self._refuse(node, "may read it as an index, a size or a scalar")
        in_place = kind != "call_module" and (target in _IN_PLACE_FUNCTIONS or str(
            getattr(target, "__name__", target)).endswith("_"))
        if (in_place or "out" in kwargs) and not (isinstance(first, ConcreteProxy) and first.fake):
            self._refuse(node, "writes into a computed tensor")

    def _refuse(self, node: fx.Node, why: str) -> None:
        self.need_values = f"'{node.name}' {why}"
        raise _NeedValues(self.need_values)

    def _record(self, proxy: ConcreteProxy, value: Any, tainted: bool, fake: bool = False) -> ConcreteProxy:
        proxy.value, proxy.tainted, proxy.fake = value, tainted, fake
        node = proxy.node
        node.meta["fxprune_value"] = _value_meta(value)
        if not tainted and not _has_tensor(value) and node.op in ("call_function", "call_method"):
            self.shape_nodes.add(node)
        return proxy

    def proxy(self, node: fx.Node) -> ConcreteProxy:
        return ConcreteProxy(node, self)

    def create_node(self, kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                    name: str | None = None, type_expr: Any = None) -> fx.Node:
        """fx's ``create_node`` with the arguments set once the node exists: ``Graph.create_node``
        scans a new node's arguments for symbolic ints (pytree, a tenth of the node's cost), and a
        concrete trace has none. Mutable-operation checks (off by default) see the arguments."""
        if self.check_mutable_operations:
            return super().create_node(kind, target, args, kwargs, name, type_expr)
        node = super().create_node(kind, target, (), {}, name, type_expr)
        if args:
            node.args = args
        if kwargs:
            node.kwargs = kwargs
        return node

    def _compute(self, kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                 fake: bool) -> Any:
        """Run one op on the concrete values of its arguments (leaves in eval mode); ``fake``:
        some argument is only right in shape."""
        a, k = map_aggregate(args, _value_of), map_aggregate(kwargs, _value_of)
        self._evaluating = True
        try:
            with torch.no_grad():
                if kind == "get_attr":
                    return _fetch(self.root, target)
                if kind == "call_method":
                    return getattr(a[0], target)(*a[1:], **k)
                if kind == "call_module":
                    module = self.root.get_submodule(target)
                    out = _shape_only_output(module, a, k, fake) if self.shape_only else None
                    if out is not None:
                        self._made_fake = True
                        return out
                    return _call_in_eval(module, a, k)
                if target in _EVAL_ARGUMENT:
                    bound = inspect.signature(target).bind(*a, **k)
                    flag, stats = _EVAL_ARGUMENT[target]
                    if bound.arguments.get(stats) is not None:
                        bound.arguments[flag] = False
                    a, k = bound.args, bound.kwargs
                return target(*a, **k)
        except Exception as exc:  # noqa: BLE001 - reported by trace() with the inputs' shapes
            what = f"{kind} {target if isinstance(target, str) else getattr(target, '__name__', target)}"
            stack = traceback.extract_stack()  # the model's frames lie below trace()'s first frame
            below = stack[next(i for i, f in enumerate(stack) if f.filename == _THIS_FILE):]
            raise _RunFailed(f"{what} failed on the example values: {_describe(exc, below)}") from exc
        finally:
            self._evaluating = False

    # ---- modules and attributes ----------------------------------------------------------
    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, fx.Proxy]) -> Any:
        if self._evaluating:
            return attr_val
        self._param_cache = parameter_proxy_cache
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaves or isinstance(m, _KEEP_AS_LEAF) or is_registered_module(m):
            return True  # a layer taught with fxprune.register_op is analysed as one op
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: torch.nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        if self._evaluating:  # inside a leaf being run on values: plain execution
            return forward(*args, **kwargs)
        path = self.path_of_module(m)
        mark = (len(self.graph.nodes), len(self.module_stack), self.num_calls.get(path, 0))
        try:
            return super().call_module(m, forward, args, kwargs)
        except (Exception, DataDependentControlFlow) as exc:  # noqa: BLE001 - any failure makes it a leaf
            self._roll_back(m, path, *mark)
            self.leaves[path] = _describe(exc)
            return super().call_module(m, forward, args, kwargs)

    def _roll_back(self, m: torch.nn.Module, path: str, n_nodes: int, depth: int, calls: int) -> None:
        """Forget a failed partial trace of ``m``: its nodes, module-stack entries and call count,
        cached parameter proxies, leaves found inside it and what its forward assigned."""
        while len(self.module_stack) > depth:
            self.module_stack.popitem(last=True)
        self.num_calls[path] = calls
        erased = list(self.graph.nodes)[n_nodes:]
        for node in reversed(erased):
            self.graph.erase_node(node)
            self.shape_nodes.discard(node)
            self.node_name_to_scope.pop(node.name, None)
        gone = set(erased)
        for name in [n for n, p in self._param_cache.items() if p.node in gone]:
            del self._param_cache[name]
        for inner in [q for q in self.leaves if q.startswith(path + ".")]:
            del self.leaves[inner]
        self._state.restore(m)

    # ---- tracing -----------------------------------------------------------------------------
    def trace(self, root: torch.nn.Module, concrete_args: None = None) -> fx.Graph:  # type: ignore[override]
        """Trace ``root`` on the example inputs (they replace fx's ``concrete_args``)."""
        self._state = _ModuleState(root)
        constants: dict[str, Any] = {}
        patches = _patches(self)
        originals = {(owner, name): vars(owner)[name] for owner, name in patches}  # a classmethod as such
        for (owner, name), stand_in in patches.items():
            setattr(owner, name, stand_in)
        try:
            graph = super().trace(root)
            # fx stores tensor constants it meets (``_tensor_constant0``) on the root; keep them
            # across the restore below, which would drop them with the forwards' caches.
            constants = {n.target: _fetch(root, n.target) for n in graph.nodes
                         if n.op == "get_attr" and "." not in n.target}
        finally:
            for (owner, name), fn in originals.items():
                setattr(owner, name, fn)
            self._state.restore(root)  # drop what forwards cached (proxies, values) on the copy
        for name, value in constants.items():
            if not hasattr(root, name):
                setattr(root, name, value)
        output = next(n for n in reversed(graph.nodes) if n.op == "output")
        for node in reversed(graph.nodes):  # shape arithmetic that only steered control flow
            if node in self.shape_nodes and not node.users:
                graph.erase_node(node)
        for node in graph.nodes:
            if node.op == "get_attr" and "fxprune_value" not in node.meta:  # constants from create_arg
                node.meta["fxprune_value"] = _meta_of(_fetch(root, node.target))
        output.meta["fxprune_value"] = fx.node.map_arg(output.args[0], lambda n: n.meta["fxprune_value"])
        return graph


def _flat(struct: Any) -> list[Any]:
    out: list[Any] = []
    map_aggregate(struct, lambda v: out.append(v))
    return out


def _fetch(root: torch.nn.Module, target: str) -> Any:
    obj: Any = root
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def _shape_only_output(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                       fake: bool) -> torch.Tensor | None:
    """The value of a leaf call that the trace does not compute, or None where it must run.

    A conv or linear yields zeros in its output's shape and strides, whether its input is real or
    fake (its output is fake either way). Given a ``fake`` input (only right in shape), a
    shape-preserving layer (BatchNorm, activation, dropout) yields that input itself, and pooling
    yields zeros of its output's shape. Another type, another call signature, a layout whose
    output layout is not known for sure (see ``_row_major``), or an input the layer does not fit
    runs for real (which then raises the real error)."""
    if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
        return None
    kind, x = type(module), args[0]
    if kind in _SHAPE_ONLY_LAYERS:
        return _layer_zeros(module, x)
    if not fake or not x.is_floating_point():
        return None
    if kind in _SHAPE_PRESERVING and _row_major(x) and (
            kind not in _BATCH_NORMS or (x.dim() > 1 and x.shape[1] == module.num_features)):
        return x  # contiguous in, same shape, dtype and strides out
    if kind in _ADAPTIVE_POOLS:  # a meta run of these costs more than the real one
        return _adaptive_pool_zeros(module, x)
    if kind in _POOLS and not getattr(module, "return_indices", False):  # indices are data, not shape
        return _meta_zeros(module, x)
    return None


def _row_major(t: torch.Tensor) -> bool:
    """Strides exactly those of a new contiguous tensor. Stricter than ``is_contiguous()``, which
    ignores the strides of size-1 dims; kernels read those to pick a layout for their output."""
    expected = 1
    for size, stride in zip(reversed(t.shape), reversed(t.stride())):
        if stride != expected:
            return False
        expected *= max(size, 1)
    return True


def _adaptive_pool_zeros(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """Zeros of an adaptive pool's output for a row-major input (the output is row-major)."""
    spatial = _ADAPTIVE_POOLS[type(module)]
    size = module.output_size
    sizes = (size,) * spatial if isinstance(size, int) else tuple(size)
    if not _row_major(x) or x.dim() not in (spatial + 1, spatial + 2) or len(sizes) != spatial:
        return None
    shape = (*x.shape[:-spatial], *(x.shape[i - spatial] if s is None else s for i, s in enumerate(sizes)))
    return torch.zeros(shape, dtype=x.dtype, device=x.device)


def _meta_zeros(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor | None:
    """Zeros in the shape and strides of ``fn(x)`` as a run on meta tensors gives them (tens of
    us instead of the op's work); None if the meta run refuses (the real call then says why)."""
    try:
        out = fn(torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta"))
    except Exception:  # noqa: BLE001 - the real call reports it
        return None
    if not isinstance(out, torch.Tensor):
        return None
    return torch.empty_strided(out.shape, out.stride(), dtype=out.dtype, device=x.device).zero_()


def _layer_zeros(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """Zeros of a conv's or linear's output for a row-major input and weight (the output is
    row-major), the shape computed from the layer's hyper-parameters (a few us; a meta run costs
    about 30, and covers string padding and unbatched inputs). Any other layout runs for real:
    its output's layout depends on the backend (CPU 3-d convs ignore channels-last), which a meta
    run does not know. So does an input that does not fit, which then raises the real error."""
    weight, bias = module.weight, module.bias
    if x.dtype != weight.dtype or x.device != weight.device or not _row_major(x) or not _row_major(weight):
        return None
    bias_on_meta = (lambda: None) if bias is None else (lambda: bias.to("meta"))
    if isinstance(module, torch.nn.Linear):
        if x.dim() == 0 or x.shape[-1] != module.in_features:
            return _meta_zeros(lambda t: F.linear(t, weight.to("meta"), bias_on_meta()), x)
        return torch.zeros((*x.shape[:-1], module.out_features), dtype=x.dtype, device=x.device)
    if x.dim() != len(module.kernel_size) + 2 or x.shape[1] != module.in_channels or isinstance(module.padding, str):
        return _meta_zeros(lambda t: module._conv_forward(t, weight.to("meta"), bias_on_meta()), x)
    shape = [x.shape[0], module.out_channels]
    for size, k, s, p, d in zip(x.shape[2:], module.kernel_size, module.stride, module.padding, module.dilation):
        shape.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
    if min(shape[2:]) <= 0:
        return None
    return torch.zeros(shape, dtype=x.dtype, device=x.device)


def _call_in_eval(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Call a leaf in eval mode (BatchNorm statistics stay put, dropout is the identity)."""
    training = [m for m in module.modules() if m.training]
    for m in training:  # the flag in the instance dict: Module.__setattr__ costs three lookups
        m.__dict__["training"] = False
    try:
        return _orig_module_call(module, *args, **kwargs)
    finally:
        for m in training:
            m.__dict__["training"] = True


_THIS_FILE = __file__


def _user_line(frames: list[traceback.FrameSummary]) -> str:
    """The innermost frame of model code (not torch, not this file), as ' at file:line `code`'."""
    for frame in reversed(frames):
        if "/torch/" not in frame.filename and frame.filename != _THIS_FILE:
            return f" at {frame.filename}:{frame.lineno} `{(frame.line or '').strip()}`"
    return ""


def _describe(exc: BaseException, stack: list[traceback.FrameSummary] | None = None) -> str:
    """One line naming the exception and the model-code line that raised it (in the exception's
    traceback, else in ``stack``: the line that called the failing op)."""
    where = _user_line(traceback.extract_tb(exc.__traceback__)) or (_user_line(stack) if stack else "")
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}{where}"


_DETECTION_CODE = ("/torchvision/models/detection/", "/torchvision/ops/")


def _remedy(exc: BaseException) -> str:
    """What to do about an untraceable root forward, by the class of model it belongs to."""
    frames = traceback.extract_tb(exc.__traceback__)
    if any(part in f.filename for f in frames for part in _DETECTION_CODE):
        return ("This is a whole detector: its root forward post-processes detections on tensor values "
                "(score top-k, NMS, box decoding) or passes objects such as ImageList between submodules, "
                "which fxprune does not capture yet. Prune its backbone with the FPN instead, "
                "e.g. fxprune.compile(model.backbone, ..., example_inputs=(torch.randn(1, 3, H, W),)): "
                "the heads keep reading the backbone's outputs, whose widths the FPN's own convs fix.")
    return ("Make that forward free of Python control flow on tensor values (control flow on shapes is "
            "fine), or move the offending code into a submodule (it then becomes an opaque leaf).")


def _capture(model: torch.nn.Module, example_inputs: tuple[Any, ...], shape_only: bool) -> tuple[fx.GraphModule, dict[str, str]]:
    tracer = ConcreteTracer(example_inputs, shape_only)
    graph = tracer.trace(model)
    if tracer.need_values:  # refused inside code that caught the signal: the graph is incomplete
        raise _NeedValues(tracer.need_values)
    graph._tracer_cls = None  # unpickling re-traces the generated code: with a plain fx.Tracer
    return lazy_graph_module(tracer.root, graph, type(model).__name__), dict(tracer.leaves)


def _capture_shapes_first(model: torch.nn.Module, copied: torch.nn.Module,
                          example_inputs: tuple[Any, ...]) -> tuple[fx.GraphModule, dict[str, str]]:
    """Capture with shape-only convs and linears; if that trace does not stand (a value it did
    not compute reached an op that might read it, or anything failed), capture again with every
    value computed, on a fresh copy: the first trace may have written into the copy's tensors.
    Warnings of a discarded first trace are dropped (the second one gives its own)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = _capture(copied, example_inputs, shape_only=True)
        except (Exception, _RunFailed, _NeedValues, DataDependentControlFlow):  # noqa: BLE001 - decided below
            result = None
    if result is None:
        copied = copy_module(model)
        checks.drop_hooks(copied)
        return _capture(copied, example_inputs, shape_only=False)
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    return result


@gc_paused
def trace(model: torch.nn.Module, example_inputs: Sequence[Any]) -> fx.GraphModule:
    """Trace an independent copy of ``model`` (copy-on-write tensors, ``modcopy.copy_module``)
    with concrete shapes from ``example_inputs``.

    Returns a GraphModule whose nodes carry ``meta["fxprune_value"]``; ``gm.meta`` holds the
    example inputs (detached clones, for the equivalence check) and
    ``fxprune_leaf_modules`` (submodules kept opaque, with the reason). A DataParallel wrapper
    is unwrapped; module hooks are not part of the graph (they are dropped from the copy, with
    an ``FxpruneWarning`` naming them, and never run while tracing).

    Raises ``ConfigError`` (not a module, example inputs missing / on the meta device /
    non-finite, meta or uninitialised weights, hook-based weight or spectral norm) and
    ``TraceError`` (the model fails on the example inputs, or its root forward branches on
    tensor values).
    """
    model = checks.model(model, "fxprune.trace")
    example_inputs = checks.example_inputs(example_inputs, "fxprune.trace")
    copied = copy_module(model)
    name = type(model).__name__
    hooks = checks.user_hooks(copied)
    if hooks:
        checks.drop_hooks(copied)
        warnings.warn(f"fxprune.trace: module hooks on {', '.join(hooks)} are not part of the traced graph and did "
                      "not run; the pruned model has none (register them again on it; modules keep their names)",
                      FxpruneWarning, stacklevel=2)
    try:
        gm, leaves = _capture_shapes_first(model, copied, example_inputs)
    except TraceError:
        raise
    except _RunFailed as exc:
        shapes = [tuple(x.shape) for x in example_inputs if isinstance(x, torch.Tensor)]
        raise TraceError(
            f"{name} failed to run on the example inputs ({shapes}): {exc}. Check the example "
            "inputs' shapes and number."
        ) from exc
    except (Exception, DataDependentControlFlow) as exc:  # the root forward itself cannot be traced
        raise TraceError(f"fxprune cannot trace the forward of {name} (the root module): {_describe(exc)}. "
                         f"{_remedy(exc)}") from exc
    gm.meta["fxprune_example_inputs"] = tuple(
        x.detach().clone() if isinstance(x, torch.Tensor) else x for x in example_inputs
    )
    gm.meta["fxprune_leaf_modules"] = leaves
    return gm
