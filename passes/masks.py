"""The masks pass: a weight mask on every prunable weight, as a parametrization.

``insert_masks`` gives a working copy of a traced module (its own modules, the traced module's
parameters) in which each named weight reads ``w * mask``; ``remove_masks`` gives the plain
module back (parameters shared, no parametrization), which finalize bakes the decision's masks
into. The parametrization passes the gradient through unmasked (straight-through), so a method
that lets pruned weights regrow (cyclical, GraNet's regrowth by gradient) sees the gradient of
every weight; a method with fixed masks multiplies the gradient by the mask
(``WeightMask.mask_grad``). Masks are buffers, so they travel in ``state_dict`` and a resumed run
continues with them.

    >>> import torch, fxprune
    >>> gm = fxprune.trace(torch.nn.Sequential(torch.nn.Linear(4, 3)), (torch.randn(2, 4),))
    >>> masked, masks = insert_masks(gm, ["0.weight"])
    >>> masks["0.weight"].set(torch.zeros(3, 4, dtype=torch.bool))
    >>> bool((masked(torch.randn(2, 4)) == gm.get_submodule("0").bias).all())
    True
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

from fxprune.errors import ConfigError
from fxprune.passes.sharing import materialize, structural_copy


class Mask(nn.Module):
    """``w * mask`` in value, the identity in gradient (the masked-out entries' gradient is kept)."""

    def __init__(self, shape: torch.Size) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones(shape, dtype=torch.bool))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        keep = self.mask.to(w.dtype)
        return w * keep + (w - w.detach()) * (1 - keep)


@dataclass
class WeightMask:
    """One masked weight: ``param`` (the trained tensor, shared with the traced module) and its
    ``mask`` buffer (True = kept)."""

    name: str
    param: nn.Parameter
    holder: Mask

    @property
    def mask(self) -> torch.Tensor:
        return self.holder.mask

    def set(self, keep: torch.Tensor, zero: bool = True) -> None:
        """Install a new mask in place; ``zero`` sets the removed weights to exactly 0, so a weight
        that comes back later restarts from 0."""
        with torch.no_grad():
            self.holder.mask.copy_(keep)
            if zero:
                self.param.mul_(keep.to(self.param.dtype))

    def effective(self) -> torch.Tensor:
        """The weight the model computes with."""
        return self.param.detach() * self.mask.to(self.param.dtype)

    def mask_grad(self) -> None:
        """Drop the gradient of removed weights (fixed-mask training)."""
        if self.param.grad is not None:
            self.param.grad.mul_(self.mask.to(self.param.grad.dtype))


def _owner(gm: nn.Module, qualname: str) -> tuple[nn.Module, str]:
    path, _, attr = qualname.rpartition(".")
    try:
        module = gm.get_submodule(path)
    except AttributeError:
        module = None
    if module is None or not isinstance(module._parameters.get(attr), nn.Parameter):
        raise ConfigError(f"cannot mask {qualname!r}: it is not a parameter of a submodule of the traced model")
    return module, attr


def insert_masks(traced: fx.GraphModule, names: Iterable[str]) -> tuple[fx.GraphModule, dict[str, WeightMask]]:
    """A copy of ``traced`` whose weights ``names`` are masked (all kept at first). Raises
    ``ConfigError`` for a name that is not a parameter of a submodule."""
    masked = structural_copy(traced)
    masks: dict[str, WeightMask] = {}
    for name in names:
        module, attr = _owner(masked, name)
        param = module._parameters[attr]
        holder = Mask(param.shape)
        parametrize.register_parametrization(module, attr, holder)
        masks[name] = WeightMask(name, param, holder)
    return materialize(masked), masks


def _masked(module: nn.Module) -> list[str]:
    """The tensors of ``module`` this pass parametrized (a user's own parametrizations are not ours)."""
    if not parametrize.is_parametrized(module):
        return []
    return [attr for attr, chain in module.parametrizations.items() if any(isinstance(p, Mask) for p in chain)]


def has_masks(module: nn.Module) -> bool:
    """Whether any submodule of ``module`` holds a mask of this pass. Raises nothing."""
    return any(_masked(m) for m in module.modules())


def remove_masks(masked: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``masked`` without this pass's parametrizations, holding the trained (unmasked)
    parameters: the module a weight Decision is finalized from. Raises nothing of its own."""
    plain = structural_copy(masked)
    for module in plain.modules():
        for attr in _masked(module):
            parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
    return materialize(plain)
