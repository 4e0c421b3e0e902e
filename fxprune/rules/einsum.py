"""``torch.einsum``: the equation names every axis, so channels are followed letter by letter.

A tracked operand's channel dim has a letter. Where that letter appears in the output, the
output's channels lie there; every operand that carries the letter holds the same channels
(they are coupled; a stored tensor is sliced with them). Where the letter is summed out between
tracked operands (attention's ``q @ k``), a removed channel is zero in each of them and adds
nothing: it is simply gone from the sum. What the rule refuses, with the reason: summing the
channels of one operand alone (its value would change), contracting them with a stored tensor
or an untracked input (a linear layer written as einsum: its removed inputs are not known to be
zero here), or an output that holds channels of two letters.

    >>> import torch, torch.nn as nn, fxprune
    >>> class Permute(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv, self.fc = nn.Conv2d(3, 8, 1), nn.Linear(8, 2)
    ...     def forward(self, x):
    ...         return self.fc(torch.einsum("bchw->bhwc", self.conv(x)))
    >>> cg = fxprune.analyze(fxprune.trace(Permute(), (torch.randn(1, 3, 4, 4),)))
    >>> [g.size for g in cg.prunable_groups]
    [8]
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from fxprune.ir import ChannelMap
from fxprune.rules.base import Category, OpRule, register_all

if TYPE_CHECKING:
    from fxprune.analysis import Walk


def subscripts(equation: str, ndims: list[int]) -> tuple[list[str], str] | None:
    """Per operand its axis letters and the output's, ``...`` expanded to digits (shared from
    the right, as einsum broadcasts them); the implicit output when there is no ``->``. None for
    an equation that does not fit the operands' ranks."""
    eq = equation.replace(" ", "")
    lhs, arrow, out = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ndims):
        return None
    widest = max((n - (len(t) - 3) for t, n in zip(terms, ndims) if "..." in t), default=0)
    ellipsis = "".join(str(i) for i in range(widest))
    expanded = []
    for t, n in zip(terms, ndims):
        if "..." in t:
            k = n - (len(t) - 3)
            t = t.replace("...", ellipsis[widest - k:] if k else "")
        if len(t) != n:
            return None
        expanded.append(t)
    if not arrow:
        letters = "".join(expanded)
        out = ellipsis + "".join(sorted(c for c in set(letters) if letters.count(c) == 1 and c.isalpha()))
    return expanded, out.replace("...", ellipsis)


def _einsum(walk: "Walk", node: fx.Node) -> Any:
    equation, *operands = node.args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if not isinstance(equation, str) or not all(walk.is_tensor(o) for o in operands):
        return walk.opaque(node, "einsum with a computed equation or non-tensor operands")
    parsed = subscripts(equation, [len(walk.meta(o).shape) for o in operands])
    if parsed is None:
        return walk.opaque(node, f"einsum '{equation}' that does not fit its operands")
    terms, out = parsed
    where = f"einsum '{equation}' at '{node.name}'"
    carried: dict[str, Any] = {}  # letter -> the channel ids it holds
    for o, t in zip(operands, terms):
        m = walk.map(o)
        if m is None:
            continue
        if len(m.dims) != 1:
            return walk.opaque(node, f"{where} with channels laid out on several dims")
        letter = t[m.dims[0]]
        if letter in carried:
            walk.couple(carried[letter], m.ids, where)
        else:
            carried[letter] = m.ids
    for letter, ids in carried.items():
        holders = [(o, t.index(letter)) for o, t in zip(operands, terms) if letter in t]
        untracked = [(o, axis) for o, axis in holders if walk.map(o) is None]
        for o, axis in untracked:
            if walk.meta(o).shape[axis] == 1:
                continue  # broadcast along the channels
            if letter in out and o.op == "get_attr":
                walk.bind(o.target, axis, ids, where)  # a per-channel factor: sliced with them
            else:
                walk.block(ChannelMap((0,), ids), f"{where} combines the channels with untracked tensor '{o.name}'")
        if letter not in out and len(holders) - len(untracked) < 2:
            walk.block(ChannelMap((0,), ids), f"{where} sums over the channels of one operand")
    in_out = [letter for letter in carried if letter in out]
    if len(in_out) > 1:
        return walk.opaque(node, f"{where} holds channels of two letters in its output")
    if not in_out:
        return None
    return ChannelMap((out.index(in_out[0]),), carried[in_out[0]])


EINSUM = OpRule("einsum", Category.COUPLE, _einsum)

register_all((torch.einsum,), EINSUM)
