"""harmsweep: locate the weights that carry harmful generation with signed SNIP, prune them, measure."""

__version__ = "0.1.0"
