"""Hydra plugin: harmsweep's launchers (the code is in harmsweep/launcher.py)."""
