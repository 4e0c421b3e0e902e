"""Graph passes: each takes a GraphModule (and the analysis it needs) and returns a result."""
from fxprune.passes.finalize import FinalizeReport, finalize
from fxprune.passes.gates import Gate, insert_gates
from fxprune.passes.verify import check_equivalence

__all__ = ["insert_gates", "finalize", "Gate", "FinalizeReport", "check_equivalence"]
