"""Graph passes: each takes a GraphModule (and the analysis it needs) and returns a result."""
from fxprune.passes.bnstats import BNStatsReport, reestimate
from fxprune.passes.compensate import CompensationReport, compensate
from fxprune.passes.finalize import FinalizeReport, finalize
from fxprune.passes.gates import Gate, apply_decision, insert_gates, read_gates, strip_gates
from fxprune.passes.masks import WeightMask, has_masks, insert_masks, remove_masks
from fxprune.passes.verify import check_equivalence

__all__ = ["insert_gates", "finalize", "reestimate", "BNStatsReport", "compensate", "CompensationReport", "Gate", "FinalizeReport", "check_equivalence", "read_gates",
           "apply_decision", "strip_gates", "insert_masks", "remove_masks", "has_masks", "WeightMask"]
