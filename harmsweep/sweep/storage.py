"""Where a sweep's shared artifacts go, checked before anything is submitted (harmsweep/sweep/launcher.py).

On a cluster the artifact cache must sit on storage every node sees and that holds it: never the home
directory (small quotas, slow shared disks) unless asked for, and only when harmsweep plan's sizing of
the sweep fits the free space there.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harmsweep.sweep.jobs import Job

log = logging.getLogger(__name__)


def _under(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def overridden(overrides: Sequence[str], key: str) -> bool:
    return any(o.split("=", 1)[0].lstrip("+~") == key for o in overrides)


def scratch_overrides(jobs: Sequence[Job], env: Mapping[str, str] | None = None) -> list[str]:
    """On SLURM: the override that moves a default artifact folder under $HOME to $SCRATCH; [] if none is.

    Raises HarmsweepError when such a folder would be under $HOME and $SCRATCH is unset. An explicit
    ``paths.artifacts=DIR`` on the command line is taken as given.
    """
    from harmsweep.errors import HarmsweepError

    env = os.environ if env is None else env
    home = env.get("HOME")
    if not home:
        return []
    for job in jobs:
        artifacts = (job.cfg or {}).get("paths", {}).get("artifacts")
        if not artifacts or overridden(job.overrides, "paths.artifacts"):
            continue
        path = Path(os.path.expanduser(str(artifacts)))
        if not _under(path, Path(home)):
            continue
        scratch = env.get("SCRATCH")
        if not scratch:
            raise HarmsweepError(
                f"paths.artifacts would be {path}, under $HOME: on a SLURM cluster the shared artifacts (score sets "
                "of 1.2 GB per 8B variant, 56 GB dense) belong on scratch storage: set paths.artifacts=DIR, or "
                "export SCRATCH (default: "
                "$SCRATCH/harmsweep/artifacts)"
            )
        return [f"paths.artifacts={Path(scratch) / 'harmsweep' / 'artifacts'}"]
    return []


def disk_problem(task_overrides: Sequence[str], extra: Sequence[str] = ()) -> str | None:
    """harmsweep plan's disk sizing of the sweep (sweep/plan.build): its problem line when it does not fit.

    A sweep that cannot be sized here (a model config not available offline, a sizing error) is not
    stopped for that: one warning line, and it is submitted.
    """
    from hydra.core.global_hydra import GlobalHydra

    from harmsweep.sweep.plan import build

    hydra = GlobalHydra.instance()
    saved = hydra.hydra
    hydra.clear()  # build() composes with its own initialize_config_dir, which needs Hydra uninitialised
    try:
        plan, _ = build(["-m", *task_overrides, *extra])
    except Exception as exc:  # sizing is advice: a model it cannot read must not stop a sweep
        detail = str(exc).splitlines()[0] if str(exc) else ""
        log.warning(f"harmsweep: could not size the sweep's disk use ({type(exc).__name__}: {detail}); not checked")
        return None
    finally:
        GlobalHydra.instance().hydra = saved
    disk = plan["disk"]
    if disk["free"] is None or disk["total"] <= disk["free"]:
        return None
    return (
        f"the sweep writes {_size(disk['total'])} of artifacts but {disk['artifacts']} has {_size(disk['free'])} "
        "free (harmsweep plan -m ... shows the sizes): free space or set paths.artifacts=DIR"
    )


def _size(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"
