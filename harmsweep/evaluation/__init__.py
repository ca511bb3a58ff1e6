"""Measurements of a model before and after pruning: likelihood, judged generations, utility, recognition."""
