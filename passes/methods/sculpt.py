"""SCULPT-ing: cyclic sparse training, then one magnitude-pruning step (Gadhikar, Nelaturu,
Burkholz; "Cyclic Sparse Training: Is it Enough?", arXiv 2406.02773), METHODS.md §8.5.

The paper's claim: most of what iterative pruning (IMP/LRR) gains comes from its repeated
cyclic *training*, not from its masks; at high sparsity the parameters must also be coupled to
the mask, which one pruning step after the cycles does cheaply. The procedure, per the authors'
harness (``multi_sclpt_harness.py``) [V]:
1. a random mask at a low ``init_sparsity`` on the untrained network (ER-balanced: every
   prunable weight tensor keeps the same number of weights where it can, the rest spread over
   the larger ones; positions drawn with ``seed``);
2. ``cycles`` equal cycles of training with that mask fixed, each with its own learning-rate
   cycle (``lr_factor``: linear warm-up from 0.2 to 1 over the first ``warmup`` of the cycle,
   then linear decay to 0) and a fresh optimizer (its state cleared at each cycle start);
3. one global magnitude prune to the target (``Budget(scope=...)``), the removed weights never
   regrow;
4. one more cycle of the same length at the target.
The run's steps are split into ``cycles + 1`` equal cycles, so it gets the same total epochs as
the other methods (the paper's cycles are each a full training run). Library choices [A]: 4
cycles, ``init_sparsity`` 0.2, the random ER-balanced start (the harness also offers SNIP and
SynFlow starts).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fxprune.errors import ConfigError
from fxprune.method import Context, register_method
from fxprune.passes.methods.sparse import WeightMethod, cycle_position


@dataclass(frozen=True)
class SculptOptions:
    cycles: int = 4
    init_sparsity: float = 0.2
    warmup: float = 0.2
    seed: int = 0


def balanced_counts(sizes: list[int], kept: int) -> list[int]:
    """Kept weights per tensor: equal shares, a tensor smaller than its share kept whole and the
    rest shared among the others (water-filling)."""
    counts = [0] * len(sizes)
    left, open_ = kept, sorted(range(len(sizes)), key=lambda i: sizes[i])
    while open_:
        share = left // len(open_)
        i = open_[0]
        if sizes[i] <= share:
            counts[i] = sizes[i]
            left -= sizes[i]
            open_.pop(0)
            continue
        for rank, j in enumerate(open_):
            counts[j] = share + (1 if rank < left - share * len(open_) else 0)
        break
    return counts


@register_method
class Sculpt(WeightMethod):
    """Cycles of training on a fixed random sparse mask, one magnitude prune, one last cycle."""

    name = "sculpt"
    Options = SculptOptions
    budgets = ("sparsity",)

    def __init__(self, **options) -> None:
        super().__init__(**options)
        o = self.options
        if o.cycles < 1 or not 0.0 <= o.init_sparsity < 1.0 or not 0.0 < o.warmup < 1.0:
            raise ConfigError(f"method 'sculpt': need cycles >= 1, 0 <= init_sparsity < 1 and 0 < warmup < 1, got "
                              f"cycles={o.cycles}, init_sparsity={o.init_sparsity}, warmup={o.warmup}")


    def start(self, ctx: Context) -> None:
        s0 = min(self.options.init_sparsity, self.final(ctx))
        names = list(self.masks)
        sizes = [self.masks[n].mask.numel() for n in names]
        counts = balanced_counts(sizes, sum(sizes) - int(round(s0 * sum(sizes))))
        g = torch.Generator().manual_seed(self.options.seed)
        keep = {}
        for name, size, count in zip(names, sizes, counts):
            flat = torch.zeros(size, dtype=torch.bool)
            flat[torch.randperm(size, generator=g)[:count]] = True
            keep[name] = flat.view(self.masks[name].mask.shape)
        self.install(ctx, keep)
        self.applied = s0

    def length(self, ctx: Context) -> float:
        return ctx.total_steps / (self.options.cycles + 1)

    def prune_step(self, ctx: Context) -> int:
        return int(round(self.options.cycles * self.length(ctx)))

    def sparsity_at(self, ctx: Context, step: int) -> float:
        return self.final(ctx) if step >= self.prune_step(ctx) else min(self.options.init_sparsity, self.final(ctx))

    def milestones(self, ctx: Context) -> set[int]:
        return {self.prune_step(ctx)}

    def after_step(self, ctx: Context) -> None:
        super().after_step(ctx)
        if ctx.optimizer is not None and ctx.step < ctx.total_steps:
            c_now, _ = cycle_position(ctx.step, self.length(ctx))
            c_before, _ = cycle_position(ctx.step - 1, self.length(ctx))
            if c_now != c_before:  # a new cycle: a fresh optimizer, as the harness builds one per cycle
                ctx.optimizer.state.clear()

    def lr_factor(self, ctx: Context, step: int) -> float | None:
        if not ctx.total_steps:
            return None
        _, pos = cycle_position(step, self.length(ctx))
        w = self.options.warmup
        return 0.2 + 0.8 * pos / w if pos < w else max(0.0, (1 - pos) / (1 - w))
