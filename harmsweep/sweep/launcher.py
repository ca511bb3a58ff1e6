"""Sweep submission that holds no GPU idle: finished runs are not submitted, shared artifacts are made once.

The profiles of conf/hydra/launcher/ (slurm_local, slurm_gpu, slurm_gpu_node, local_jobs) use
hydra-submitit-launcher's SlurmLauncher / LocalLauncher with this module's launch():

1. **Done runs are skipped.** Every job of the batch is composed as the job itself will compose it; a job
   whose run folder ``<hydra.sweep.dir>/<run id>`` holds result.json is done (pipeline/run.py writes it last). It
   is not submitted; the sweeper gets a COMPLETED JobReturn for it. ``hydra.launcher.skip_done=false``
   submits it anyway (its job then returns the stored result).
2. **Shared artifacts are made by one job per group.** The pending pruning runs are grouped by what their
   shared artifacts (calibration, scores, the unpruned evaluation) can depend on: the config without
   ``pruning`` and without what the run id ignores (config.NOT_IN_RUN_ID), plus the artifact folder and
   the cache versions. A group of two or more runs gets one prepare job (``stage=prepare``:
   pipeline.run.prepare computes calibration, the union of the score kinds its runs need and eval_before), then
   its runs as one job array that SLURM starts only once the prepare job has succeeded
   (``--dependency=afterok:<id>``); on submitit_local the driver runs the prepare jobs first. A group
   whose prepare job already succeeded (``<sweep>/.prepare/<key>/prepare.json``, artifacts still there)
   gets none. Experiments with their own bodies (experiments.RUNNERS), runs without a shared cache
   (paths.artifacts=null) and groups of one are submitted as before. ``hydra.launcher.prepare_shared=false``
   turns grouping off (every run computes or waits for what it needs, under the cache's lock).
3. **Storage is checked before anything is submitted** (harmsweep/sweep/storage.py). On SLURM the shared artifacts must not land in
   $HOME: a ``paths.artifacts`` not given on the command line that would be under $HOME becomes
   ``$SCRATCH/harmsweep/artifacts``, or, without $SCRATCH, the driver stops with one line. A sweep whose
   artifacts do not fit the free space (harmsweep plan's sizing, sweep/plan.build) stops with one line too.

Nothing here imports torch at module level: Hydra imports the plugin module on every start.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, LocalQueueConf, SlurmQueueConf

from harmsweep.sweep.jobs import (
    PREPARE_SUFFIX,
    Group,
    Job,
    compose_job,
    group_jobs,
    is_prepare,
    is_prepared,
    prepare_overrides,
)
from harmsweep.sweep.storage import disk_problem, overridden, scratch_overrides

log = logging.getLogger(__name__)

PLUGIN_MODULE = "hydra_plugins.harmsweep_launcher.harmsweep_launcher"


# ---------------------------------------------------------------- launcher configs (hydra/launcher group)


@dataclass
class HarmsweepSlurmConf(SlurmQueueConf):
    """submitit_slurm plus harmsweep's switches."""

    _target_: str = f"{PLUGIN_MODULE}.HarmsweepSlurmLauncher"
    skip_done: bool = True  # a run whose result.json exists is not submitted
    prepare_shared: bool = True  # one prepare job per group of runs sharing artifacts, the runs depend on it
    # artifacts may stay under $HOME: a one-node cluster (slurm_local), where $HOME is the jobs' own disk
    artifacts_in_home: bool = False


@dataclass
class HarmsweepLocalConf(LocalQueueConf):
    """submitit_local (each job its own process on this machine) plus harmsweep's two switches."""

    _target_: str = f"{PLUGIN_MODULE}.HarmsweepLocalLauncher"
    skip_done: bool = True
    prepare_shared: bool = True


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(group="hydra/launcher", name="harmsweep_slurm", node=HarmsweepSlurmConf(), provider="harmsweep")
    store.store(group="hydra/launcher", name="harmsweep_local", node=HarmsweepLocalConf(), provider="harmsweep")


# ---------------------------------------------------------------- what the driver knows of each job


# ---------------------------------------------------------------- grouping


def dependency_parameters(additional: Mapping[str, Any], job_ids: Sequence[str]) -> dict[str, Any]:
    """sbatch additional parameters that hold a job until ``job_ids`` succeeded (a user's dependency kept)."""
    after = "afterok:" + ":".join(job_ids)
    existing = additional.get("dependency")
    return {**additional, "dependency": f"{existing},{after}" if existing else after}


# ---------------------------------------------------------------- JobReturns for jobs that were not run


def _job_return(job: Job, status: JobStatus, value: Any) -> JobReturn:
    from omegaconf import OmegaConf

    ret = JobReturn(overrides=list(job.overrides), status=status, working_dir=str(job.run_dir or ""))
    if job.sweep_cfg is not None:
        ret.cfg = OmegaConf.create(job.cfg or {})
        ret.hydra_cfg = OmegaConf.create({"hydra": OmegaConf.to_container(job.sweep_cfg.hydra, resolve=False)})
        ret.task_name = str(job.sweep_cfg.hydra.job.name)
    ret.return_value = value
    return ret


def done_return(job: Job) -> JobReturn:
    """What the sweeper gets for a finished run that was not submitted again (the task returns None)."""
    return _job_return(job, JobStatus.COMPLETED, None)


def failed_return(job: Job, error: BaseException) -> JobReturn:
    return _job_return(job, JobStatus.FAILED, error)


# ---------------------------------------------------------------- the launcher


class SweepLauncherMixin:
    """launch() of hydra-submitit-launcher's launchers, skipping done runs and preparing shared artifacts."""

    _EXECUTOR: str
    params: dict[str, Any]
    config: Any
    hydra_context: Any

    def __init__(
        self, skip_done: bool = True, prepare_shared: bool = True, artifacts_in_home: bool = False, **params: Any
    ) -> None:
        super().__init__(**params)  # type: ignore[call-arg]
        self.skip_done = bool(skip_done)
        self.prepare_shared = bool(prepare_shared)
        self.artifacts_in_home = bool(artifacts_in_home)

    def __call__(self, sweep_overrides: list[str], *args: Any, **kwargs: Any) -> JobReturn:
        """In the job: as the plugin's, but a prepare job that raised exits non-zero, so its runs never start."""
        ret = super().__call__(sweep_overrides, *args, **kwargs)  # type: ignore[misc]
        if is_prepare(sweep_overrides) and ret.status != JobStatus.COMPLETED:
            _ = ret.return_value  # raises the run's exception: submitit fails the job, SLURM marks it FAILED
        return ret

    # -- submission

    def _executor(self) -> Any:
        """The plugin's executor, built as BaseSubmititLauncher.launch builds it."""
        import submitit
        from omegaconf import OmegaConf

        init_keys = {"max_num_timeout", "submitit_folder"}
        executor = submitit.AutoExecutor(
            cluster=self._EXECUTOR,
            folder=self.params["submitit_folder"],
            **{f"{self._EXECUTOR}_max_num_timeout": v for k, v in self.params.items() if k == "max_num_timeout"},
        )
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in self.params.items() if k not in init_keys}
        )
        return executor

    def _submit(self, executor: Any, jobs: Sequence[Job], overrides: Sequence[list[str]] | None = None) -> list[Any]:
        from hydra.core.singleton import Singleton
        from hydra.core.utils import filter_overrides

        overrides = overrides or [j.overrides for j in jobs]
        params = []
        for job, over in zip(jobs, overrides, strict=True):
            log.info(f"\t#{job.index} : {' '.join(filter_overrides(over))}")
            params.append((list(over), "hydra.sweep.dir", job.index, f"job_id_for_{job.index}", Singleton.get_state()))
        return executor.map_array(self, *zip(*params, strict=True))

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")
        jobs = [
            compose_job(self.config, self.hydra_context.config_loader, o, initial_job_idx + i)
            for i, o in enumerate(job_overrides)
        ]
        returns: list[JobReturn | None] = [None] * len(jobs)
        pending = []
        for i, job in enumerate(jobs):
            if self.skip_done and job.done:
                returns[i] = done_return(job)
            else:
                pending.append(job)
        if len(pending) < len(jobs):
            log.info(f"harmsweep: {len(jobs) - len(pending)} of {len(jobs)} runs are done already: not submitted")
        if not pending:
            return returns  # type: ignore[return-value]

        self._check_storage(pending)
        groups, alone = group_jobs(pending) if self.prepare_shared else ([], pending)
        position = {job.index: i for i, job in enumerate(jobs)}
        executor = self._executor()
        to_prepare = [g for g in groups if not is_prepared(g)]
        alone += [j for g in groups if g not in to_prepare for j in g.jobs]
        for g in to_prepare:
            log.info(f"harmsweep: runs {', '.join(f'#{j.index}' for j in g.jobs)} share artifacts: one prepare job "
                     f"(scores: {', '.join(g.kinds) or 'none'}) first")  # fmt: skip
        prepared = self._submit_prepare(executor, to_prepare)
        failures: dict[str, BaseException] = {}
        run_jobs: dict[int, Any] = {}  # job.index -> submitit job
        if self._EXECUTOR == "slurm":  # SLURM holds each group's array until its prepare job succeeded
            additional = dict(self.params.get("additional_parameters") or {})
            for g in to_prepare:
                executor.update_parameters(
                    slurm_additional_parameters=dependency_parameters(additional, [prepared[g.key].job_id])
                )
                run_jobs.update(zip((j.index for j in g.jobs), self._submit(executor, g.jobs), strict=True))
            executor.update_parameters(slurm_additional_parameters=additional)
            if alone:
                run_jobs.update(zip((j.index for j in alone), self._submit(executor, alone), strict=True))
            for g in to_prepare:  # a failed prepare job: its runs would wait forever (afterok): cancel them
                error = _prepare_error(prepared[g.key], g)
                if error is not None:
                    failures[g.key] = error
                    for j in g.jobs:
                        run_jobs.pop(j.index).cancel(check=False)
        else:  # no dependencies between local processes: the prepare jobs end before the runs start
            for g in to_prepare:
                error = _prepare_error(prepared[g.key], g)
                if error is not None:
                    failures[g.key] = error
            ready = alone + [j for g in to_prepare if g.key not in failures for j in g.jobs]
            ready.sort(key=lambda j: j.index)
            if ready:
                run_jobs.update(zip((j.index for j in ready), self._submit(executor, ready), strict=True))
        for g in to_prepare:
            if g.key in failures:
                for j in g.jobs:
                    returns[position[j.index]] = failed_return(j, failures[g.key])
        for index, submitted in run_jobs.items():
            returns[position[index]] = submitted.results()[0]
        return returns  # type: ignore[return-value]

    def _submit_prepare(self, executor: Any, groups: Sequence[Group]) -> dict[str, Any]:
        """One prepare job per group (one array), named <name>-prepare."""
        if not groups:
            return {}
        name = self.params.get("name") or "harmsweep"
        executor.update_parameters(name=f"{name}{PREPARE_SUFFIX}")
        submitted = self._submit(executor, [g.jobs[0] for g in groups], [prepare_overrides(g) for g in groups])
        executor.update_parameters(name=name)
        return {g.key: s for g, s in zip(groups, submitted, strict=True)}

    def _check_storage(self, pending: Sequence[Job]) -> None:
        """$HOME and free space, before any submission; may add paths.artifacts=$SCRATCH/... to every job."""
        from harmsweep.errors import HarmsweepError, exit_usage

        try:
            extra = scratch_overrides(pending) if self._EXECUTOR == "slurm" and not self.artifacts_in_home else []
        except HarmsweepError as exc:
            exit_usage(str(exc))
        if extra:
            log.info(f"harmsweep: {extra[0]} (the default would be under $HOME)")
            for job in pending:
                if overridden(job.overrides, "paths.artifacts"):  # its own (e.g. swept) folder: as given
                    continue
                job.overrides.append(extra[0])
                if job.cfg is not None:
                    job.cfg["paths"]["artifacts"] = extra[0].split("=", 1)[1]
        problem = disk_problem(list(self.config.hydra.overrides.task), extra)
        if problem:
            exit_usage(problem)


def _prepare_error(submitted: Any, group: Group) -> BaseException | None:
    """Wait for a prepare job; the error its runs fail with if it did not succeed, else None."""
    try:
        ret = submitted.results()[0]
        if ret.status == JobStatus.COMPLETED:
            return None
        detail = str(ret._return_value)
    except Exception as exc:  # submitit: FailedJobError (it raised), UncompletedJobError (killed, timed out)
        detail = str(exc)
    lines = [line for line in detail.strip().splitlines() if line.strip() and not line.startswith("-" * 5)]
    last = lines[-1] if lines else "no output"
    runs = ", ".join(f"#{j.index}" for j in group.jobs)
    return RuntimeError(
        f"the prepare job {submitted.job_id} of runs {runs} failed, so they were not started: {last} "
        f"(its log: {group.prepare_dir} and the job's .submitit folder)"
    )
