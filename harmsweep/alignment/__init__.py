"""Alignment variants derived by fine-tuning (safety-tuned, dealigned) and the fine-tuning itself."""
