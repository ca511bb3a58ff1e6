"""Pruning: which weights to change (rules, granularities, sequential), applying masks, and low-rank removal."""
