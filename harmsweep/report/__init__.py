"""Aggregate finished runs into the compression report: tables, plots, HTML, a W&B report run."""
