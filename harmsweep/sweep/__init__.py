"""The sweep side: launching jobs (local, SLURM), grouping shared work, sizing jobs (`harmsweep plan`). No torch at import."""
