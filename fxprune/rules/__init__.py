"""Op rules: one record per op kind, read by both the analysis and finalize (see ``base``).

Importing this package registers fxprune's own rules; ``register_op`` adds a user's, and
``per_channel`` / ``elementwise`` build the rules most custom layers need.
"""
from fxprune.rules import combine, einsum, movement, norms, pointwise, producers, shapes  # noqa: F401 (registration)
from fxprune.rules.base import (
    Category, OpRule, Rewrite, is_registered_module, op_name, register_op, rule_for,
)
from fxprune.rules.norms import per_channel
from fxprune.rules.pointwise import elementwise

__all__ = ["Category", "OpRule", "Rewrite", "register_op", "rule_for", "is_registered_module",
           "op_name", "per_channel", "elementwise"]
