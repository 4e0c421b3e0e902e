"""Op rules: one record per op kind, read by both the analysis and finalize (see ``base``).

Importing this package registers fxprune's own rules; ``register_op`` adds a user's
(``register_named`` for a class named by its module path), and ``per_channel`` /
``elementwise`` / ``norm_then_act`` build the rules most custom layers need.
"""
from fxprune.rules import (  # noqa: F401 (registration)
    combine, einsum, movement, norms, pointwise, producers, rearrange, shapes,
)
from fxprune.rules.base import (
    Category, OpRule, Rewrite, is_registered_module, op_name, register_named, register_op, rule_for,
)
from fxprune.rules.norms import norm_then_act, per_channel
from fxprune.rules.pointwise import elementwise

__all__ = ["Category", "OpRule", "Rewrite", "register_op", "register_named", "rule_for", "is_registered_module",
           "op_name", "per_channel", "elementwise", "norm_then_act"]
