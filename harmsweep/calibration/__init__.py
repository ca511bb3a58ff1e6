"""Calibration: the (prompt, response) pairs that scoring reads, tokenised, and the run's splits and sets."""
