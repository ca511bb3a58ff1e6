"""Masks from outside a run: given mask files, masks recovered from pruned checkpoints, comparisons of two masks."""
