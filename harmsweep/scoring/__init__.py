"""Scoring: per-weight scores (signed SNIP, unsigned SNIP, Wanda), their exact top-k, summaries and storage."""
