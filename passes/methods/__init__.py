"""Pruning methods: each a small file of hooks over the shared channel graph (``fxprune.method``).

Importing this package registers them by name. Channel methods (flops/params/latency budgets): l1,
gdp, greg1, greg2, tpp, functionality, wgates, dais, dsa. Weight methods (sparsity/N:M budgets, ``sparse``): gmp,
cyclical, nm, granet, lap, sculpt, greg1w.
"""
from fxprune.passes.methods.cyclical import NM, Cyclical
from fxprune.passes.methods.dais import DAIS
from fxprune.passes.methods.dsa import DSA
from fxprune.passes.methods.functionality import Functionality
from fxprune.passes.methods.gated import GateMethod
from fxprune.passes.methods.gdp import GDP
from fxprune.passes.methods.gmp import GMP
from fxprune.passes.methods.granet import GraNet
from fxprune.passes.methods.greg import GReg1, GReg2
from fxprune.passes.methods.gregw import GReg1Weights
from fxprune.passes.methods.l1 import L1Norm
from fxprune.passes.methods.lap import LAP
from fxprune.passes.methods.sculpt import Sculpt
from fxprune.passes.methods.sparse import WeightMethod
from fxprune.passes.methods.tpp import TPP
from fxprune.passes.methods.wgates import WGates

__all__ = ["Cyclical", "DAIS", "DSA", "Functionality", "GateMethod", "GDP", "GMP", "GraNet", "GReg1", "GReg2", "GReg1Weights", "L1Norm", "LAP",
           "NM", "Sculpt", "TPP", "WeightMethod", "WGates"]
