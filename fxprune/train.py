"""The built-in training loop that ``fxprune.compile`` runs between ``prepare`` and ``decide``.

Pruning methods plug in through callables instead of subclassing a trainer: ``extra_loss``
adds their regularizer to every step, ``after_backward`` edits gradients before the optimizer
step, ``on_step`` advances their schedules after it, and ``train_step`` replaces the whole step
for a method that owns it (bi-level search). Everything the loop measures comes back as
data (one ``EpochLog`` per epoch) before anything is printed.
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from fxprune import checks
from fxprune.errors import ConfigError, FxpruneError, FxpruneWarning

__all__ = ["EpochLog", "evaluate", "train"]


@dataclass
class EpochLog:
    """What one epoch (0-based ``epoch``) did. ``train_loss`` is the task loss only, so runs with different
    ``extra_loss`` terms stay comparable; ``lr`` is the first parameter group's rate at
    the epoch's first step; ``seconds`` covers training, not evaluation."""

    epoch: int
    train_loss: float
    train_acc: float
    eval_acc: float | None
    seconds: float
    lr: float
    extra: dict[str, Any] = field(default_factory=dict)


def _param_groups(
    model: nn.Module,
    params: Iterable[nn.Parameter] | None,
    extra_param_groups: list[dict] | None,
) -> list[dict]:
    """The main group plus ``extra_param_groups``; parameters listed in an extra group are
    removed from the main one, because gates inserted by ``prepare`` live inside the model
    and would otherwise appear twice (which torch optimizers reject)."""
    extra_groups = [dict(group, params=list(group["params"])) for group in extra_param_groups or []]
    claimed = {id(p) for group in extra_groups for p in group["params"]}
    main = [p for p in (model.parameters() if params is None else params) if id(p) not in claimed]
    groups = [{"params": main}] if main else []
    return groups + extra_groups


def _make_optimizer(
    name: str, groups: list[dict], lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"optimizer must be 'sgd' or 'adam', got {name!r}")


def train(
    model: nn.Module,
    loader: DataLoader,
    epochs: int,
    *,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    optimizer: str = "sgd",
    schedule: str = "cosine",
    loss_fn: Callable[[Any, Tensor], Tensor] | None = None,
    output: Callable[[Any], Any] | None = None,
    example_inputs: tuple[Any, ...] | None = None,
    extra_loss: Callable[[], Tensor] | None = None,
    on_step: Callable[[int], None] | None = None,
    after_backward: Callable[[], None] | None = None,
    train_step: Callable[[tuple[Tensor, Tensor], torch.optim.Optimizer], tuple[Tensor, Tensor]] | None = None,
    eval_loader: DataLoader | None = None,
    params: Iterable[nn.Parameter] | None = None,
    extra_param_groups: list[dict] | None = None,
    progress: bool = True,
    desc: str = "train",
    log: Callable[[dict], None] | None = None,
    epoch_metrics: Callable[[], dict] | None = None,
    lr_factor: Callable[[int], float] | None = None,
    on_optimizer: Callable[[torch.optim.Optimizer], None] | None = None,
    device: str | torch.device = "cpu",
) -> list[EpochLog]:
    """Train ``model`` in place for ``epochs`` epochs and return one ``EpochLog`` per epoch.

    Each step: forward, ``output(outputs)`` (for a model that returns a tuple or dict: picks
    the logits), task loss (cross-entropy on class indices by default, else ``loss_fn(logits,
    labels)``) plus ``extra_loss()``,
    backward, ``after_backward()``, optimizer step, learning-rate step, then ``on_step(step)``
    with the 0-based index of the step just taken, counted across epochs. ``train_step(batch,
    optimizer) -> (logits, task loss)`` replaces forward to optimizer step when given (its logits
    are what accuracy reads: ``output`` already applied). ``schedule="cosine"``
    anneals every group's rate to zero over all steps (per step, not per epoch, so short
    runs anneal smoothly); ``lr_factor(step)`` replaces the schedule by that multiplier of ``lr``
    (a method's own, e.g. per-cycle restarts). ``on_optimizer`` receives the optimizer once it
    exists (a method that edits its state). ``log`` receives each epoch's log as a dict and
    ``epoch_metrics()`` fills its ``extra`` (e.g. the current FLOPs of a gated model).
    The model is moved to ``device``. Seeding is the caller's job; the loop itself uses
    no nondeterministic op, so a fixed ``torch.manual_seed`` reproduces a run.

    Every batch is checked before it is used (``fxprune.checks``): (inputs, labels) pairs of
    tensors, inputs shaped like ``example_inputs`` when given, class labels within the model's
    outputs. Raises ``ConfigError`` naming the loader and the problem (also for a batch of one
    that BatchNorm cannot train on: use ``drop_last=True``), and ``FxpruneError`` when the loss
    becomes NaN/Inf.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ConfigError(f"epochs must be a non-negative int, got {epochs!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ConfigError(f"lr must be a positive number, got {lr!r}")
    if schedule not in ("cosine", "constant"):
        raise ConfigError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ConfigError("the training loader yields no batches; check its dataset (empty?) and drop_last with a "
                          "batch_size larger than the dataset")
    if epochs == 0:
        return []
    model.to(device)
    groups = _param_groups(model, params, extra_param_groups)
    if not groups:
        raise ConfigError("no parameters to optimize (params and extra_param_groups are empty)")
    opt = _make_optimizer(optimizer, groups, lr, momentum, weight_decay)
    if on_optimizer is not None:
        on_optimizer(opt)
    if lr_factor is not None:
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    elif schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    else:
        scheduler = None
    criterion = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
    where = f"{desc}: the training loader"
    _warn_single_example_batch(model, loader, where)

    logs: list[EpochLog] = []
    step = 0
    for epoch in range(epochs):
        model.train()
        epoch_lr = opt.param_groups[0]["lr"]
        loss_sum, correct, seen = 0.0, 0, 0
        start = time.perf_counter()
        bar = tqdm(loader, desc=f"{desc} {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for item in bar:
            inputs, targets = checks.batch(item, where)
            if step == 0 and example_inputs is not None:
                checks.batch_matches(inputs, example_inputs, where)
            inputs, targets = inputs.to(device), targets.to(device)
            if train_step is not None:
                with _single_example_batch(inputs, where):
                    outputs, task_loss = train_step((inputs, targets), opt)
                loss = task_loss
            else:
                opt.zero_grad(set_to_none=True)
                with _single_example_batch(inputs, where):
                    outputs = _logits(model(inputs), output, loss_fn, where)
                if loss_fn is None:
                    checks.class_labels(outputs, targets, where)
                task_loss = criterion(outputs, targets)
                loss = task_loss + extra_loss() if extra_loss is not None else task_loss
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise FxpruneError(
                    f"{desc}: loss became {loss_value} at epoch {epoch + 1}, step {step}; "
                    "lower the learning rate or the method's regularization strength"
                )
            if train_step is None:
                loss.backward()
                if after_backward is not None:
                    after_backward()
                opt.step()
            if scheduler is not None:
                scheduler.step()
            if on_step is not None:
                on_step(step)
            step += 1
            batch = targets.shape[0]
            loss_sum += task_loss.item() * batch
            correct += _correct(outputs, targets)
            seen += batch
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
        bar.close()
        seconds = time.perf_counter() - start
        entry = EpochLog(
            epoch=epoch,
            train_loss=loss_sum / seen,
            train_acc=correct / seen,
            eval_acc=evaluate(model, eval_loader, device, output=output) if eval_loader is not None else None,
            seconds=seconds,
            lr=epoch_lr,
            extra=epoch_metrics() if epoch_metrics is not None else {},
        )
        logs.append(entry)
        if log is not None:
            log(asdict(entry))
    return logs


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: str | torch.device = "cpu",
             output: Callable[[Any], Any] | None = None) -> float:
    """Top-1 accuracy in [0, 1] in eval mode; the model's previous train/eval mode is restored,
    so evaluating between training epochs does not leave BN layers frozen. ``output`` picks the
    logits from a model that returns a tuple or dict. Raises ``ConfigError`` for a loader that
    yields no samples or malformed batches, and for labels outside the model's classes."""
    was_training = model.training
    model.to(device)
    model.eval()
    where = "the evaluation loader"
    try:
        correct, seen = 0, 0
        for item in loader:
            inputs, targets = checks.batch(item, where)
            outputs = _logits(model(inputs.to(device)), output, None, where)
            targets = targets.to(device)
            checks.class_labels(outputs, targets, where)
            correct += _correct(outputs, targets)
            seen += targets.shape[0]
    finally:
        model.train(was_training)
    if seen == 0:
        raise ConfigError("the evaluation loader yields no samples")
    return correct / seen


def _logits(outputs: Any, output: Callable[[Any], Any] | None, loss_fn: Callable | None, where: str) -> Any:
    """What the loss and accuracy read: ``output(outputs)``, or the outputs themselves, which must
    be a tensor unless a ``loss_fn`` takes them as they are."""
    if output is not None:
        outputs = output(outputs)
    if loss_fn is None and not isinstance(outputs, Tensor):
        raise ConfigError(f"{where}: the model returns a {type(outputs).__name__}, not a tensor of logits; pass "
                          "output=... to pick the logits (e.g. output=lambda out: out[0] or out['logits']), "
                          "or loss_fn=... that takes the outputs as they are")
    return outputs


def _correct(logits: Any, labels: Tensor) -> int:
    """Top-1 hits where the outputs are class scores for class-index labels, else 0."""
    if isinstance(logits, Tensor) and logits.dim() == 2 and labels.dim() == 1 and not labels.is_floating_point():
        return int((logits.argmax(dim=1) == labels).sum())
    return 0


def _warn_single_example_batch(model: nn.Module, loader: DataLoader, where: str) -> None:
    """A last batch of one example gives BatchNorm no batch statistics (BatchNorm1d refuses it)."""
    size, dataset = getattr(loader, "batch_size", None), getattr(loader, "dataset", None)
    if not size or getattr(loader, "drop_last", True) or not hasattr(dataset, "__len__"):
        return
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_bn and size > 1 and len(dataset) % size == 1:
        warnings.warn(f"{where}: the last batch of every epoch holds one example ({len(dataset)} examples, "
                      f"batch_size={size}); BatchNorm learns nothing sound from it: pass drop_last=True to the "
                      "DataLoader", FxpruneWarning, stacklevel=3)


@contextlib.contextmanager
def _single_example_batch(inputs: Tensor, where: str) -> Iterator[None]:
    """Turns BatchNorm's refusal of a one-example batch into an error that says what to do."""
    try:
        yield
    except ValueError as exc:
        if inputs.dim() and inputs.shape[0] == 1 and "more than 1 value per channel" in str(exc):
            raise ConfigError(f"{where} gave a batch of one example, which BatchNorm cannot normalise in training "
                              f"({exc}); pass drop_last=True to the DataLoader") from exc
        raise
