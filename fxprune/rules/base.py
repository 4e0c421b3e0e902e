"""The op-rule record and its registry: one owner for everything fxprune knows about an op.

A rule says how an op moves channels (``propagate``, read by the analysis) and what finalize
must do to it once channels are gone (``gate_params``, ``resize``, ``rewrite``). Analysis and
finalize read the same record, so teaching fxprune a layer is one ``register_op`` call::

    >>> import torch, torch.nn as nn, fxprune
    >>> class Scale(nn.Module):             # y = x * s, one s per channel
    ...     def __init__(self, c):
    ...         super().__init__()
    ...         self.s = nn.Parameter(torch.ones(c))
    ...     def forward(self, x):
    ...         return x * self.s.view(1, -1, 1, 1)
    >>> fxprune.register_op(Scale, fxprune.rules.per_channel(params=("s",)))

An op without a rule blocks the channels it touches, with the op named in the reason.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from fxprune.errors import ConfigError

if TYPE_CHECKING:  # only for annotations: the analysis imports the rules, not the reverse
    from fxprune.analysis import Walk
    from fxprune.ir import ChannelGraph


class Category(str, enum.Enum):
    """How an op treats channels; finalize and the dead-branch pass branch on it, not on types."""

    PRODUCER = "producer"    # conv / linear: a new channel space
    NORM = "norm"            # per-channel statistics and affine parameters
    POINTWISE = "pointwise"  # element-wise on one tensor (activations, dropout, casts)
    SPATIAL = "spatial"      # channel dim kept, other dims change (pooling, padding, resizing)
    COUPLE = "couple"        # element-wise over several operands (add, mul): channels unite
    CONCAT = "concat"
    SPLIT = "split"
    MOVEMENT = "movement"    # pure data movement (view, permute, indexing)
    REDUCE = "reduce"        # reductions over non-channel dims, softmax over them
    SHAPE = "shape"          # size queries and integer arithmetic on sizes


@dataclass
class Rewrite:
    """What a rule's ``rewrite`` sees in finalize: the graph being finalized and the decision."""

    gm: fx.GraphModule
    cg: "ChannelGraph"
    keep: dict[int, np.ndarray]
    _alive: Callable[[np.ndarray], np.ndarray] | None = field(default=None, init=False, repr=False)

    def kept(self, ids: np.ndarray) -> np.ndarray:
        """Boolean mask over ``ids``: True where the channel survives."""
        if self._alive is None:
            self._alive = self.cg.survivors(self.keep)
        return self._alive(ids)

    def map_of(self, node: Any) -> Any:
        return self.cg.node_maps.get(node.name) if isinstance(node, fx.Node) else None


Propagate = Callable[["Walk", fx.Node], Any]
GateParams = Callable[[fx.GraphModule, fx.Node], list[tuple[str, int]]]


@dataclass(frozen=True)
class OpRule:
    """Everything fxprune knows about one kind of op.

    - ``propagate(walk, node)``: the output's channel map(s) from the inputs' (see ``Walk``);
      it may couple channels, bind parameter dims to them, or block them with a reason.
    - ``gate_params(gm, node)``: parameters that scale the node's output channels linearly,
      with their channel dim; a gate right after the node folds into them exactly.
    - ``resize(module)``: make a module's size attributes agree with its sliced parameters.
    - ``rewrite(rw, node)``: edit literal arguments that spell out channel counts.
    - ``per_channel``: maps a per-channel constant to a per-channel constant (BN, activations),
      so a removed branch's constant can be followed through it, and computed by running the op
      on one value per channel.
    - ``keeps_zero(node, modules)``: an all-zero channel stays all zero through this call, though
      its values may move (pooling, resizing, zero padding, reductions over other dims): a
      removed channel is then known to be zero downstream without running the model.
    - ``subclasses``: the rule is true of any subclass of the class it is registered for, even
      one that overrides ``forward``; by default such a subclass gets no rule (see ``_Registry``).
    """

    name: str
    category: Category
    propagate: Propagate
    gate_params: GateParams | None = None
    resize: Callable[[nn.Module], None] | None = None
    rewrite: Callable[[Rewrite, fx.Node], None] | None = None
    per_channel: bool = False
    keeps_zero: Callable[[fx.Node, dict[str, nn.Module]], bool] | None = None
    subclasses: bool = False


def always(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """``keeps_zero`` of ops that keep a zero channel zero whatever their arguments."""
    return True


class _Registry:
    """Rules by function object, method name and module class (most specific class wins).

    A module class is found by its own entry, or by its qualified name (``register_named``: for
    layers of optional packages, without importing them). A subclass inherits a base's rule only
    if it computes what the base computes: it overrides neither ``forward`` nor a method that
    the base's ``forward`` calls on ``self`` (``_conv_forward``), or the rule says
    ``subclasses=True``. timm's ``BatchNormAct2d`` subclasses ``BatchNorm2d`` and adds an
    activation in its own ``forward``; BatchNorm's rule would fold gates through that activation.
    """

    def __init__(self) -> None:
        self.functions: dict[Any, OpRule] = {}
        self.methods: dict[str, OpRule] = {}
        self.modules: dict[type, OpRule] = {}
        self.named: dict[str, OpRule] = {}

    def _table(self, target: Any) -> dict:
        if isinstance(target, str):
            return self.methods
        if isinstance(target, type):
            if not issubclass(target, nn.Module):
                raise ConfigError(f"register_op: {target.__name__} is a class but not an nn.Module; "
                                  "register a module class, a function, or a method name (str)")
            return self.modules
        if callable(target):
            return self.functions
        raise ConfigError(f"register_op: cannot register {target!r}; give a module class, a function "
                          "or a tensor method name such as 'view'")

    def add(self, target: Any, rule: OpRule, replace: bool, table: dict | None = None) -> None:
        table = self._table(target) if table is None else table
        if target in table and not replace and table[target] is not rule:
            raise ConfigError(f"register_op: {op_label(target)} already has the rule {table[target].name!r}; "
                              "pass replace=True to override it")
        table[target] = rule

    def _own(self, cls: type) -> OpRule | None:
        rule = self.modules.get(cls)
        return rule if rule is not None else self.named.get(class_name(cls))

    def resolve(self, cls: type) -> tuple[OpRule | None, type | None]:
        """``cls``'s rule, and the nearest registered class (itself or a base) it was sought from:
        a base with a rule but no rule means the subclass changed what the base computes."""
        for base in cls.__mro__:
            rule = self._own(base)
            if rule is not None:
                honest = base is cls or rule.subclasses or _computes_as(cls, base)
                return (rule if honest else None), base
        return None, None

    def module_rule(self, module: nn.Module) -> OpRule | None:
        return self.resolve(type(module))[0]

    def lookup(self, node: fx.Node, modules: dict[str, nn.Module]) -> OpRule | None:
        if node.op == "call_module":
            return self.module_rule(modules[node.target])
        if node.op == "call_method":
            return self.methods.get(node.target)
        if node.op == "call_function":
            try:
                return self.functions.get(node.target)
            except TypeError:  # an unhashable callable
                return None
        return None


REGISTRY = _Registry()


_FUNCTION_TARGETS: dict[type, Callable[..., Any]] = {}


def function_target(cls: type) -> Callable[..., Any]:
    """The graph target that stands for a ``torch.autograd.Function`` subclass: calling it runs
    ``cls.apply``. ``fxprune.trace`` records a Function's call as this one opaque node (tracing
    through its ``forward`` would drop its custom backward); ``register_op(cls, rule)`` attaches
    a rule to it. Such a traced module cannot be pickled whole: save its ``state_dict``."""
    if cls not in _FUNCTION_TARGETS:
        def apply(*args: Any, **kwargs: Any) -> Any:
            return cls.apply(*args, **kwargs)

        apply.__name__ = apply.__qualname__ = f"{cls.__name__}_apply"
        _FUNCTION_TARGETS[cls] = apply
    return _FUNCTION_TARGETS[cls]


def register_op(target: Any, rule: OpRule, *, replace: bool = False) -> None:
    """Teach fxprune an op: ``target`` is a module class, a ``torch.autograd.Function`` subclass,
    a function, or a tensor method name.

    Module classes registered here are also kept as leaves by ``fxprune.trace``, so their own
    forward is not traced into (Functions always are). Their subclasses get the rule only if
    they keep its ``forward`` (see ``_Registry``); register a subclass that changes it, or build
    the rule with ``subclasses=True``. Raises ``ConfigError`` if ``target`` already has a
    different rule and ``replace`` is False.
    """
    if not isinstance(rule, OpRule):
        raise ConfigError(f"register_op expects an fxprune.rules.OpRule, got {type(rule).__name__}")
    if isinstance(target, type) and issubclass(target, torch.autograd.Function):
        target = function_target(target)
    REGISTRY.add(target, rule, replace)


def register_named(qualname: str, rule: OpRule, *, replace: bool = False) -> None:
    """``register_op`` for a module class named by ``module.QualName`` (``type(m).__module__``
    and ``__qualname__``): a layer of a package fxprune does not import, such as
    ``"timm.layers.norm_act.BatchNormAct2d"``. Raises ``ConfigError`` as ``register_op`` does."""
    if not isinstance(rule, OpRule):
        raise ConfigError(f"register_named expects an fxprune.rules.OpRule, got {type(rule).__name__}")
    if not isinstance(qualname, str) or "." not in qualname:
        raise ConfigError(f"register_named: {qualname!r} is not a qualified class name such as "
                          "'timm.layers.norm_act.BatchNormAct2d'")
    REGISTRY.add(qualname, rule, replace, table=REGISTRY.named)


def class_name(cls: type) -> str:
    """The name ``register_named`` knows a class by."""
    return f"{cls.__module__}.{cls.__qualname__}"


def _computes_as(cls: type, base: type) -> bool:
    """Whether ``cls`` runs ``base``'s forward and every method that forward names (one level:
    ``Conv2d.forward`` -> ``_conv_forward``, ``_BatchNorm.forward`` -> ``_check_input_dim``)."""
    code = getattr(base.forward, "__code__", None)
    called = {n for n in code.co_names if callable(getattr(base, n, None))} if code is not None else set()
    return all(getattr(cls, n, None) is getattr(base, n, None) for n in {"forward", "__call__", *called})


def register_all(targets: Any, rule: OpRule) -> None:
    """Register one rule for several targets (fxprune's own tables)."""
    for t in targets:
        REGISTRY.add(t, rule, replace=False)


def rule_for(node: fx.Node, modules: dict[str, nn.Module]) -> OpRule | None:
    """The rule of ``node``'s op, or None."""
    return REGISTRY.lookup(node, modules)


def gate_anchor(gm: fx.GraphModule, node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node:
    """Where a producer's channels are gated (or scored by their norm): the producer itself, or
    its sole user when that user is a norm with per-channel affine parameters (a gate after it
    folds into them exactly). Never past a layer norm: it mixes the channels it normalizes, so a
    gate after one is that norm's own site (``rules.norms``), not a producer's."""
    users = list(node.users)
    if len(users) == 1 and users[0].args and users[0].args[0] is node:
        rule = rule_for(users[0], modules)
        if rule is not None and rule.category is Category.NORM and rule.name != "layer_norm" \
                and rule.gate_params is not None \
                and rule.gate_params(gm, users[0]):
            return users[0]
    return node


def is_registered_module(module: nn.Module) -> bool:
    return REGISTRY.module_rule(module) is not None


def op_label(target: Any) -> str:
    if isinstance(target, str):
        return f"class {target}" if "." in target else f"method .{target}()"
    if isinstance(target, type):
        return f"module class {target.__name__}"
    return f"function {getattr(target, '__module__', '') or ''}.{getattr(target, '__name__', str(target))}"


def op_name(node: fx.Node) -> str:
    """A readable name for a node's op: function, method or module class."""
    if node.op == "call_module":
        return f"module {node.target}"
    if node.op == "call_method":
        return f"method .{node.target}()"
    return op_label(node.target).replace("_operator.", "operator.")


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` of ``node`` whether passed positionally or as keyword ``name``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)
