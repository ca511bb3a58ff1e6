"""The launcher classes Hydra instantiates (plugins must live in the hydra_plugins package).

conf/hydra/launcher/slurm_*.yaml name HarmsweepSlurmLauncher, local_jobs.yaml HarmsweepLocalLauncher; what they
do differently from hydra-submitit-launcher's SlurmLauncher / LocalLauncher is in harmsweep/sweep/launcher.py.
"""

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher

from harmsweep.sweep.launcher import SweepLauncherMixin, register_configs


class HarmsweepSlurmLauncher(SweepLauncherMixin, SlurmLauncher):
    """submitit_slurm, minus done runs, plus one prepare job per group of runs sharing artifacts."""


class HarmsweepLocalLauncher(SweepLauncherMixin, LocalLauncher):
    """submitit_local, minus done runs, plus one prepare job per group (run before the group's runs)."""


register_configs()
