"""Measurements of a (pruned) model: judge-free likelihood metrics for now."""

from harmsweep.evaluation.likelihood import likelihood_metrics, mean_response_nll

__all__ = ["likelihood_metrics", "mean_response_nll"]
