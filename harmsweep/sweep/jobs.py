"""The jobs of a sweep as the driver sees them: composed, found done, grouped by the artifacts they share.

No torch here: Hydra imports the launcher plugin (and so this module) on every start.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harmsweep.errors import HarmsweepError

if TYPE_CHECKING:
    from harmsweep.config.schema import Config

PREPARE_DIR = ".prepare"  # <hydra.sweep.dir>/.prepare/<group key>/: the prepare jobs' folders
PREPARE_MARKER = "prepare.json"  # written by pipeline.run.prepare once every artifact of the group exists
PREPARE_SUFFIX = "-prepare"  # SLURM job name of a prepare job: <hydra.launcher.name>-prepare


@dataclass
class Job:
    """One job of the sweep as the driver composes it (cfg None: it could not be composed here)."""

    index: int  # hydra.job.num
    overrides: list[str]
    cfg: dict[str, Any] | None = None  # the plain resolved config the job's run_pipeline will see
    run_dir: Path | None = None
    sweep_dir: Path | None = None  # hydra.sweep.dir (the run folder may sit deeper: hydra.sweep.subdir)
    sweep_cfg: Any = None  # the full composed config (DictConfig, with hydra)
    error: str | None = None  # why it could not be composed (the job itself will say so)

    @property
    def done(self) -> bool:
        return is_done(self.run_dir)

    def typed(self) -> Config | None:
        """The job's config as typed blocks (None: it could not be composed or does not fit the schema)."""
        if self.cfg is None:
            return None
        from harmsweep.config.schema import to_config  # only a driver that groups jobs needs the schema

        try:
            return to_config(self.cfg)
        except Exception:  # the job will fail with its own message
            return None


def is_done(run_dir: Path | None) -> bool:
    """pipeline/run.py writes result.json last: its presence means the run finished."""
    return run_dir is not None and (run_dir / "result.json").is_file()


def compose_job(config: Any, config_loader: Any, overrides: Sequence[str], index: int) -> Job:
    """The job's config and run folder, composed exactly as the job will compose them."""
    from omegaconf import OmegaConf, open_dict, read_write

    job = Job(index=index, overrides=list(overrides))
    try:
        sweep_cfg = config_loader.load_sweep_config(config, list(overrides))
        with open_dict(sweep_cfg.hydra.job):
            sweep_cfg.hydra.job.num = index
        sweep_dir = Path(str(sweep_cfg.hydra.sweep.dir))
        run_dir = sweep_dir / str(sweep_cfg.hydra.sweep.subdir)
        task_cfg = copy.deepcopy(sweep_cfg)
        with read_write(task_cfg), open_dict(task_cfg):
            del task_cfg["hydra"]
        job.cfg = OmegaConf.to_container(task_cfg, resolve=True, throw_on_missing=True)
        job.run_dir, job.sweep_dir, job.sweep_cfg = run_dir, sweep_dir, sweep_cfg
    except Exception as exc:  # the job will fail with its own message; here it is only not skipped or grouped
        job.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return job


def group_key(cfg: Mapping[str, Any] | None) -> str | None:
    """What a run's shared artifacts depend on, hashed; None: the run computes alone (submitted as before): an
    experiment with its own body shares nothing unless it names its shared stages (experiments.SHARED).

    The config without ``pruning`` and without what the run id ignores (config.run_id), plus the artifact
    folder (runs with different caches share nothing), the score store settings (``scores``: not in the run
    id, but in the score sets' keys) and the cache versions.
    """
    from harmsweep.experiments import RUNNERS, SHARED

    alone = cfg is not None and cfg.get("experiment") in RUNNERS and cfg.get("experiment") not in SHARED
    if cfg is None or alone or (cfg.get("stage") or "run") != "run":
        return None
    artifacts = (cfg.get("paths") or {}).get("artifacts")
    if not artifacts:  # paths.artifacts=null: every run keeps its own artifacts, nothing to share
        return None
    from harmsweep.cache import VERSIONS, content_key
    from harmsweep.config.identity import run_id

    shared = run_id({k: v for k, v in cfg.items() if k != "pruning"})
    return content_key(shared, os.path.abspath(os.path.expanduser(str(artifacts))), cfg.get("scores"), VERSIONS)


def needed_scores(cfg: Config | None) -> set[str]:
    """The score sets a run reads, as pipeline.run.prepare takes them: ``kind@granularity@benign_importance``.

    The kinds are PruneSpec.needed_scores(); compact score sets are also keyed by the unit and ranking of
    their reader (pipeline.stages.score), so a group sweeping pruning.granularity prepares one set per unit. An
    invalid pruning block needs nothing here (its job fails with its own message).
    """
    if cfg is None:
        return set()
    try:
        spec = cfg.prune_spec()
    except HarmsweepError:
        return set()
    if spec.sequential or cfg.method != "prune":
        return set()  # scored in memory, layer by layer: nothing shared to prepare
    return {f"{kind}@{spec.granularity}@{spec.benign_importance}" for kind in spec.needed_scores()}


def tail_keep(cfg: Config | None) -> tuple[float, float] | None:
    """What a run's compact score sets keep, harm and benign side (``scores.keep*``, auto sized by its pruning
    block: scoring.spec.StoreSpec.resolved); None: the run reads no compact set."""
    if cfg is None or cfg.scores.store != "compact" or not needed_scores(cfg):
        return None
    from harmsweep.scoring.spec import StoreSpec

    kept = cfg.scores.resolved(*StoreSpec.needs(cfg.prune_spec()))
    return kept.fraction("harm"), kept.fraction("benign")


@dataclass
class Group:
    key: str
    jobs: list[Job]
    kinds: list[str] = field(default_factory=list)  # the union of the score sets the runs read (needed_scores)
    keep: tuple[float, float] | None = None  # the largest tails its runs need (tail_keep): what the prepare job keeps

    @property
    def prepare_dir(self) -> Path:
        """<hydra.sweep.dir>/.prepare/<key>: where prepare_overrides puts the prepare job (hydra.sweep.subdir)."""
        first = self.jobs[0]
        sweep_dir = first.sweep_dir or (first.run_dir.parent if first.run_dir else None)
        assert sweep_dir is not None, "a group's jobs were composed"
        return sweep_dir / PREPARE_DIR / self.key


def group_jobs(jobs: Sequence[Job]) -> tuple[list[Group], list[Job]]:
    """Groups of two or more runs that share artifacts (in sweep order), and the jobs that run alone."""
    by_key: dict[str, list[Job]] = {}
    alone: list[Job] = []
    for job in jobs:
        key = group_key(job.cfg)
        if key is None:
            alone.append(job)
        else:
            by_key.setdefault(key, []).append(job)
    groups = []
    for key, members in by_key.items():
        if len(members) == 1:  # a group of one computes its artifacts itself, nobody waits for it
            alone.extend(members)
            continue
        typed = [j.typed() for j in members]
        kinds = sorted(set().union(*(needed_scores(t) for t in typed)))
        needs = [n for n in map(tail_keep, typed) if n is not None]
        keep = (max(n[0] for n in needs), max(n[1] for n in needs)) if needs else None
        if keep is not None:  # a relaunch whose runs need longer tails gets its own prepare job
            from harmsweep.cache import content_key

            key = content_key(key, keep)
        groups.append(Group(key=key, jobs=members, kinds=kinds, keep=keep))
    alone.sort(key=lambda j: j.index)
    return groups, alone


def is_prepared(group: Group) -> bool:
    """The group's prepare job already succeeded and what it made is still there: no prepare job needed."""
    import json

    marker = group.prepare_dir / PREPARE_MARKER
    if not marker.is_file():
        return False
    try:
        done = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if not set(group.kinds) <= set(done.get("prepared_scores", [])):
        return False
    return all(Path(p).exists() for p in done.get("artifacts", {}).values())


PREPARE_KEYS = ("stage", "prepare_scores", "hydra.sweep.subdir", "scores.keep", "scores.keep_benign")


def prepare_overrides(group: Group) -> list[str]:
    """The first run's overrides turned into the group's prepare job: stage=prepare, the kinds, its own folder,
    and score tails as long as the longest any of its runs reads (so every run reuses them)."""
    base = [o for o in group.jobs[0].overrides if o.split("=", 1)[0].lstrip("+~") not in PREPARE_KEYS]
    keep = [f"scores.keep={group.keep[0]!r}", f"scores.keep_benign={group.keep[1]!r}"] if group.keep else []
    return [
        *base,
        *keep,
        "stage=prepare",
        f"prepare_scores=[{','.join(group.kinds)}]",
        f"hydra.sweep.subdir={PREPARE_DIR}/{group.key}",
    ]


def is_prepare(overrides: Sequence[str]) -> bool:
    return "stage=prepare" in overrides
