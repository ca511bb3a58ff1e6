"""Measurements of a model before and after pruning: likelihood, judged generations, utility, recognition."""

from harmsweep.evaluation.likelihood import mean_response_nll

__all__ = ["mean_response_nll"]
