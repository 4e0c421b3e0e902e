"""The method interface: hooks over an explicit context, options as a dataclass, a Decision out.

A method never reaches into the compiler through attributes: every hook receives the
``Context`` (the module being trained, the channel graph, the cost model and targets, the step
counters, what tracing found). The flow (``fxprune.prepare`` / ``compile``) calls the hooks in
this order, and a hand-written training loop calls them through ``Prepared``:

    prepare(ctx)                                  once
    per step: loss(ctx) -> backward -> after_backward(ctx) -> optimizer step -> after_step(ctx)
              (or train_step(ctx, batch, optimizers) for a method that owns the step)
    decide(ctx, data) -> Decision                 once; finalize carries it out

A user-defined method subclasses ``Method``, sets ``name`` and implements ``decide`` (and the
hooks it needs); ``register_method`` makes it available by name.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import torch
import torch.fx as fx

from fxprune.budget import Targets
from fxprune.cost import CostModel
from fxprune.decision import Decision
from fxprune.errors import ConfigError
from fxprune.ir import ChannelGraph


@dataclass
class Context:
    """What every hook sees. ``module`` is the module being trained: the traced module, or a
    gated copy of it that shares its parameters once a method inserts gates."""

    module: fx.GraphModule
    traced: fx.GraphModule
    graph: ChannelGraph
    cost: CostModel
    targets: Targets
    example_inputs: tuple[Any, ...]
    leaf_modules: dict[str, str] = field(default_factory=dict)  # untraceable submodules and why
    step: int = 0
    total_steps: int | None = None
    show_progress: bool = True  # progress bars for a method's own long work (compile's progress)
    optimizer: torch.optim.Optimizer | None = None  # the training loop's, where it told (compile, Prepared.step)
    # for a method that owns the step: the logits of the model's outputs and the task loss on them
    # (compile sets them from its ``output`` and ``loss_fn``; None: the outputs, cross-entropy)
    output: Callable[[Any], Any] | None = None
    task_loss: Callable[[Any, torch.Tensor], torch.Tensor] | None = None

    @property
    def progress(self) -> float:
        """Fraction of ``total_steps`` done (0 without a step budget)."""
        return self.step / self.total_steps if self.total_steps else 0.0


def _check_option(method: str, name: str, value: Any, default: Any) -> None:
    """An option has its default's kind (a float option takes any finite real number): a string
    where a number belongs would otherwise fail deep inside training, or compare silently."""
    if default is None or default is dataclasses.MISSING:
        return
    kinds: dict[type, tuple[type, ...]] = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}
    want = kinds.get(type(default))
    if want is None:
        return
    ok = isinstance(value, want) and (want == (bool,) or not isinstance(value, bool))
    if ok and isinstance(value, float) and not math.isfinite(value):
        ok = False
    if not ok:
        raise ConfigError(f"method {method!r} option {name}={value!r}: expected a {'finite ' if want[-1] is float else ''}"
                          f"{want[-1].__name__} like its default {default!r}")


@dataclass(frozen=True)
class NoOptions:
    """A method without options."""


class Method:
    """Base class of pruning methods; see the module docstring for the hook order.

    Class attributes: ``name``; ``Options`` (a dataclass; ``describe()`` and the report come
    from it); ``needs_training`` (decides from what training learned: compile refuses to run it
    without a loader); ``needs_total_steps`` (schedules over the run); ``needs_data`` (``decide``
    reads a calibration loader); ``granularity`` (``"channel"``: removes units of channel groups
    under a flops/params/latency budget; ``"weight"``: zeroes single weights under a sparsity
    budget); ``resources`` (the cost-model resources a channel method's decision can be held to:
    a method that decides through ``fxprune.budget.allocate`` or ``Targets.met`` meets any).
    """

    name: ClassVar[str] = "method"
    granularity: ClassVar[str] = "channel"
    Options: ClassVar[type] = NoOptions
    needs_training: ClassVar[bool] = False
    needs_total_steps: ClassVar[bool] = False
    needs_data: ClassVar[bool] = False
    resources: ClassVar[tuple[str, ...]] = ("macs", "params", "latency")

    def __init__(self, **options: Any) -> None:
        fields = {f.name for f in dataclasses.fields(self.Options)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise ConfigError(f"method {self.name!r} has no option(s) {unknown}; its options: {sorted(fields) or 'none'}")
        for f in dataclasses.fields(self.Options):
            if f.name in options:
                _check_option(self.name, f.name, options[f.name], f.default)
        self.options = self.Options(**options)

    # ---- hooks ---------------------------------------------------------------------------------
    def prepare(self, ctx: Context) -> None:
        """Insert gates/masks into ``ctx.module`` if the method needs them (default: nothing)."""

    def loss(self, ctx: Context) -> torch.Tensor | None:
        """Extra training loss of this step (default: none)."""
        return None

    def after_backward(self, ctx: Context) -> None:
        """Edit gradients between backward and the optimizer step (default: nothing)."""

    def after_step(self, ctx: Context) -> None:
        """Advance schedules after the optimizer step (default: nothing)."""

    def decide(self, ctx: Context, data: Any = None) -> Decision:
        raise NotImplementedError(f"{type(self).__name__} must implement decide(ctx, data=None) -> Decision")

    # ``train_step(ctx, batch, optimizers) -> loss`` may be defined by a method that owns the step.
    train_step: ClassVar[Any] = None

    # ---- what the flow needs to know -------------------------------------------------------
    def parameters(self, ctx: Context) -> list[torch.nn.Parameter]:
        """The method's own trainable parameters (gates), optimised in their own group."""
        return []

    def lr_factor(self, ctx: Context, step: int) -> float | None:
        """The learning-rate multiplier at 0-based ``step``, for a method whose mechanism includes
        the rate (cyclic training restarts it per cycle); None (default): the trainer's schedule."""
        return None

    def schedule(self, ctx: Context) -> dict[str, float]:
        """Current values of the method's schedules (lambda, temperature ...), for logs."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ConfigError(f"method {self.name!r} has no state to load, got keys {sorted(state)}")

    def report(self, ctx: Context) -> dict[str, Any]:
        """What the method measured or spent (e.g. calibration passes), for the compile report."""
        return {}

    def describe(self) -> dict[str, Any]:
        """The options, for the report."""
        return dataclasses.asdict(self.options)


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available by its ``name`` to ``prepare``/``compile``/the CLI.

    Raises ``ConfigError`` for a class that is not a named ``Method`` subclass, has no ``decide``,
    or takes a name already registered."""
    if not (isinstance(cls, type) and issubclass(cls, Method)) or cls.name == Method.name:
        raise ConfigError("register_method expects a Method subclass with its own name")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ConfigError(f"a method named {cls.name!r} is already registered ({METHODS[cls.name].__name__}); "
                          "give yours another name")
    if cls.decide is Method.decide:
        raise ConfigError(f"method {cls.name!r} ({cls.__name__}) must define decide(self, ctx, data=None) -> "
                          "fxprune.Decision: it is what finalize carries out")
    METHODS[cls.name] = cls
    return cls


def method_names() -> Sequence[str]:
    return sorted(METHODS)
