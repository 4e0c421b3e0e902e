"""Pruning methods: each a small file of hooks over the shared channel graph (``fxprune.method``).

Importing this package registers them by name: l1, gdp, greg1, greg2, tpp, functionality.
"""
from fxprune.passes.methods.functionality import Functionality
from fxprune.passes.methods.gated import GateMethod
from fxprune.passes.methods.gdp import GDP
from fxprune.passes.methods.greg import GReg1, GReg2
from fxprune.passes.methods.l1 import L1Norm
from fxprune.passes.methods.tpp import TPP

__all__ = ["Functionality", "GateMethod", "GDP", "GReg1", "GReg2", "L1Norm", "TPP"]
