"""Hydra plugin: harmsweep's launchers (the code is in harmsweep/sweep/launcher.py)."""
