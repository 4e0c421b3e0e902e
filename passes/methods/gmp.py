"""GMP: gradual magnitude pruning (Zhu and Gupta, 2017), the baseline of weight sparsity.

Sparsity follows the cubic ramp s(t) = s_f + (0 - s_f)(1 - (t - t0)/(t1 - t0))^3 from ``begin``
to ``end`` (fractions of the training steps), the masks recomputed every ``interval`` steps from
the magnitude of the weights the model computes with; removed weights get no gradient and never
return (their magnitude is 0). After ``end`` the mask is fixed and training goes on: the
fine-tune is part of the same run, so every method gets the same total epochs.
``begin == end`` prunes once at that point: ``gmp:begin=0.5;end=0.5`` is one-shot magnitude
pruning of a half-trained model followed by fixed-mask fine-tuning (the benchmark's one-shot
baseline); with no training at all (``compile(epochs=0)``) decide prunes the given weights once.
Defaults (begin 0.1, end 0.7, an update every 1% of the steps) are this library's: the paper
ramps over a hand-set step range per model.
"""
from __future__ import annotations

from fxprune.method import register_method
from fxprune.passes.methods.sparse import ScheduleOptions, WeightMethod


@register_method
class GMP(WeightMethod):
    """Gradual magnitude pruning along the cubic schedule; fixed masks between updates."""

    name = "gmp"
    Options = ScheduleOptions
