"""Every method on the same data, budget and schedule: the benchmark the method issues report with.

A thin wrapper around ``fxprune.flow.bench`` (also ``fxprune bench``); see its docstring for what
is measured and how runs are kept comparable (equal total epochs, the same split and batch order,
seeds varying only the initial weights).

    python benchmarks/methods.py                              # l1 gdp greg1 greg2 tpp, digits-hard,
                                                              # 50/25/10% FLOPs, seeds 0,1,2
    python benchmarks/methods.py --methods l1,gdp --dataset digits --flops 0.5,0.25 --seeds 0,1
    python benchmarks/methods.py --jobs 2 --resume            # two runs at a time; skip finished runs

Results: benchmarks/results/methods.{json,md,png} (``--out`` changes the stem).
"""
from __future__ import annotations

import sys

from fxprune.flow.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
