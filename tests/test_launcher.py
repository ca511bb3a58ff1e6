"""The sweep launcher without a cluster: done runs, grouping, prepare jobs, dependencies, storage checks.

launch() is driven through Hydra's own plugin machinery (the profile's _target_, the real config loader) with a
recording stand-in for submitit's executor; the last test runs a real sweep with hydra/launcher=local_jobs.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import prewarmed
import pytest
from conftest import write_pairs
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext, RunMode
from omegaconf import OmegaConf

import harmsweep.sweep.jobs as sweep_jobs
import harmsweep.sweep.launcher as hl
import harmsweep.sweep.storage as storage
from harmsweep.cli import _run_id_resolver
from harmsweep.config.identity import run_id
from harmsweep.config.schema import register
from harmsweep.errors import HarmsweepError

CONF = Path(__file__).resolve().parents[1] / "conf"
OmegaConf.register_new_resolver("harmsweep_run_id", _run_id_resolver, replace=True)
register()

COMMON = ["model=tiny_llama", "calibration=file", "calibration.harmful.file=/nonexistent/h.jsonl",
          "calibration.benign.file=/nonexistent/b.jsonl", "data.root=null", "eval=likelihood"]  # fmt: skip


# ---------------------------------------------------------------- a launcher as Hydra builds it, a fake executor


class FakeJob:
    def __init__(self, job_id: str, overrides: list[str], error: Exception | None = None) -> None:
        self.job_id, self.overrides, self.error, self.cancelled = job_id, overrides, error, False

    def results(self) -> list[JobReturn]:
        assert not self.cancelled, f"waited for cancelled job {self.job_id}"
        if self.error is not None:
            raise self.error
        ret = JobReturn(overrides=self.overrides, status=JobStatus.COMPLETED)
        ret.return_value = f"ran {self.job_id}"
        return [ret]

    def cancel(self, check: bool = True) -> None:
        self.cancelled = True


class FakeExecutor:
    """Records every map_array call with the parameters in force; prepare jobs fail when told to."""

    def __init__(self, fail_prepare: bool = False) -> None:
        self.parameters: dict[str, Any] = {"name": "harmsweep", "slurm_additional_parameters": {"requeue": True}}
        self.arrays: list[dict[str, Any]] = []
        self.fail_prepare = fail_prepare

    def update_parameters(self, **kwargs: Any) -> None:
        self.parameters.update(kwargs)

    def map_array(self, fn: Any, overrides, dirs, nums, ids, states) -> list[FakeJob]:
        array = 100 + len(self.arrays)
        jobs = []
        for i, over in enumerate(overrides):
            error = RuntimeError("Traceback ...\nValueError: calibration file is broken") if (
                self.fail_prepare and sweep_jobs.is_prepare(over)) else None  # fmt: skip
            jobs.append(FakeJob(f"{array}_{i}", list(over), error))
        self.arrays.append({"overrides": [list(o) for o in overrides], "nums": list(nums),
                            "parameters": json.loads(json.dumps(self.parameters)), "jobs": jobs})  # fmt: skip
        return jobs


@pytest.fixture(autouse=True)
def cache_off_home(tmp_path, monkeypatch):
    """Artifacts under tmp_path (not $HOME: the SLURM profiles would refuse them), no $SCRATCH of the caller's."""
    monkeypatch.setenv("HARMSWEEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SCRATCH", raising=False)


@pytest.fixture
def hydra_ctx() -> Iterator[Any]:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield GlobalHydra.instance().config_loader()


def make_launcher(loader: Any, sweep: Path, *hydra_overrides: str, profile: str = "slurm_local", common=COMMON):
    """The profile's launcher, instantiated and set up by Hydra as a multirun would."""
    master = loader.load_configuration(
        config_name="config",
        overrides=[f"hydra/launcher={profile}", f"hydra.sweep.dir={sweep}", *hydra_overrides, *common],
        run_mode=RunMode.MULTIRUN,
    )
    from hydra._internal.callbacks import Callbacks

    launcher = Plugins.instance().instantiate_launcher(
        hydra_context=HydraContext(config_loader=loader, callbacks=Callbacks(master)),
        task_function=lambda cfg: None,
        config=master,
    )
    return launcher


def drive(launcher, jobs: list[list[str]], monkeypatch, fail_prepare: bool = False):
    executor = FakeExecutor(fail_prepare)
    monkeypatch.setattr(launcher, "_executor", lambda: executor)
    monkeypatch.setattr(hl, "disk_problem", lambda *a, **k: None)
    returns = launcher.launch([COMMON + j for j in jobs], initial_job_idx=0)
    return returns, executor


def finish(sweep: Path, loader: Any, overrides: list[str]) -> Path:
    """Make a run look done: result.json in the folder its job would use."""
    job = sweep_jobs.compose_job(make_launcher(loader, sweep).config, loader, COMMON + overrides, 0)
    job.run_dir.mkdir(parents=True)
    (job.run_dir / "result.json").write_text("{}")
    return job.run_dir


# ---------------------------------------------------------------- the plugin and its profiles


def test_every_slurm_profile_and_local_jobs_use_the_harmsweep_launcher(hydra_ctx, tmp_path):
    for profile, cls in (("slurm_local", "HarmsweepSlurmLauncher"), ("slurm_gpu", "HarmsweepSlurmLauncher"),
                         ("slurm_gpu_node", "HarmsweepSlurmLauncher"), ("local_jobs", "HarmsweepLocalLauncher")):  # fmt: skip
        launcher = make_launcher(hydra_ctx, tmp_path, profile=profile)
        assert type(launcher).__name__ == cls and launcher.skip_done and launcher.prepare_shared
        # the plugin's own keys reach submitit unchanged; harmsweep's two do not
        assert "skip_done" not in launcher.params and "prepare_shared" not in launcher.params
    slurm = make_launcher(hydra_ctx, tmp_path, "hydra.launcher.skip_done=false", "hydra.launcher.qos=high")
    assert slurm.skip_done is False and slurm.params["qos"] == "high" and slurm.params["partition"] == "debug"
    assert slurm.params["additional_parameters"] == {"requeue": True}


def test_the_executor_gets_the_profile_settings(hydra_ctx, tmp_path, monkeypatch):
    srun = tmp_path / "bin" / "srun"  # submitit looks for srun on PATH before it takes parameters; nothing is submitted
    srun.parent.mkdir()
    srun.write_text("#!/bin/sh\nexit 1\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{srun.parent}{os.pathsep}{os.environ['PATH']}")
    launcher = make_launcher(hydra_ctx, tmp_path / "s", "hydra.launcher.mem_gb=5")
    executor = launcher._executor()
    p = executor._executor.parameters
    assert p["partition"] == "debug" and p["mem"] == "5GB" and p["array_parallelism"] == 4
    assert p["additional_parameters"] == {"requeue": True}
    assert executor._executor.max_num_timeout == 2


# ---------------------------------------------------------------- done runs


def test_the_driver_composes_each_job_as_the_job_will(hydra_ctx, tmp_path):
    launcher = make_launcher(hydra_ctx, tmp_path)
    job = sweep_jobs.compose_job(launcher.config, hydra_ctx, [*COMMON, "pruning.sparsity=0.03"], 7)
    assert job.error is None and job.cfg["pruning"]["sparsity"] == 0.03
    assert job.run_dir == tmp_path / run_id(job.cfg) and job.sweep_dir == tmp_path  # hydra.sweep.subdir: the run id
    assert not job.done
    (job.run_dir).mkdir()
    (job.run_dir / "run.json").write_text("{}")
    assert not job.done  # started is not done: result.json is written last
    (job.run_dir / "result.json").write_text("{}")
    assert job.done
    broken = sweep_jobs.compose_job(launcher.config, hydra_ctx, ["pruning.sparsity=lots"], 0)
    assert broken.cfg is None and "sparsity" in broken.error and not broken.done


def test_done_runs_are_not_submitted_and_return_completed(hydra_ctx, tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    finish(sweep, hydra_ctx, ["pruning.sparsity=0.01"])
    finish(sweep, hydra_ctx, ["pruning.sparsity=0.02"])
    launcher = make_launcher(hydra_ctx, sweep)
    returns, executor = drive(launcher, [["pruning.sparsity=0.01"], ["pruning.sparsity=0.02"]], monkeypatch)
    assert executor.arrays == []  # nothing submitted at all
    assert [r.status for r in returns] == [JobStatus.COMPLETED] * 2 and [r.return_value for r in returns] == [None] * 2
    assert returns[0].overrides[-1] == "pruning.sparsity=0.01" and Path(returns[0].working_dir).parent == sweep
    assert returns[0].cfg.pruning.sparsity == 0.01 and returns[0].hydra_cfg.hydra.sweep.dir == str(sweep)

    # one done, one not: only the pending one goes out (alone: a group of one needs no prepare job)
    returns, executor = drive(launcher, [["pruning.sparsity=0.01"], ["pruning.sparsity=0.05"]], monkeypatch)
    (array,) = executor.arrays
    assert [o[-1] for o in array["overrides"]] == ["pruning.sparsity=0.05"] and array["nums"] == [1]
    assert returns[0].return_value is None and returns[1].return_value == "ran 100_0"


def test_skip_done_false_submits_finished_runs_again(hydra_ctx, tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    finish(sweep, hydra_ctx, ["pruning.sparsity=0.01"])
    launcher = make_launcher(hydra_ctx, sweep, "hydra.launcher.skip_done=false")
    returns, executor = drive(launcher, [["pruning.sparsity=0.01"]], monkeypatch)
    assert len(executor.arrays) == 1 and returns[0].return_value == "ran 100_0"


# ---------------------------------------------------------------- grouping


def job(
    cfg_overrides: dict[str, Any] | None = None, index: int = 0, artifacts: str | None = "/scratch/a"
) -> sweep_jobs.Job:
    cfg: dict[str, Any] = {
        "model": {"name": "tiny_llama", "dtype": "float32"}, "alignment": {"name": "aligned"},
        "calibration": {"n": 6}, "eval": {"n": 4}, "seed": 0, "experiment": None, "stage": "run",
        "pruning": {"rule": "signed_snip", "sparsity": 0.01, "protect": 0.01, "harm_fraction": None,
                    "granularity": "global", "benign_importance": "abs_signed"},
        "paths": {"cache_dir": "/c", "artifacts": artifacts}, "logger": {"name": "none"}, "scores": {"store": "compact"},
    }  # fmt: skip
    for key, value in (cfg_overrides or {}).items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return sweep_jobs.Job(index=index, overrides=[f"{k}={v}" for k, v in (cfg_overrides or {}).items()], cfg=cfg,
                  run_dir=Path("/sweep") / f"run{index}")  # fmt: skip


def test_runs_that_differ_only_in_pruning_form_one_group_with_the_union_of_their_scores():
    jobs = [
        job({"pruning.sparsity": 0.01}, 0),
        job({"pruning.rule": "random"}, 1),
        job({"pruning.rule": "unsigned_snip", "pruning.benign_importance": "unsigned"}, 2),
        job({"pruning.rule": "signed_snip", "pruning.protect": 0.0}, 3),
        job({"logger.name": "wandb", "paths.cache_dir": "/elsewhere", "scoring": {"offload": False}}, 4),
    ]
    (group,), alone = sweep_jobs.group_jobs(jobs)
    assert alone == [] and [j.index for j in group.jobs] == [0, 1, 2, 3, 4]
    # each score set a run reads, with the unit and ranking it is read by (compact sets are keyed by them)
    assert group.kinds == ["benign@global@abs_signed", "benign_unsigned@global@unsigned", "harm@global@abs_signed",
                           "harm_unsigned@global@unsigned"]  # fmt: skip
    assert group.prepare_dir == Path("/sweep") / ".prepare" / group.key


def test_what_changes_artifacts_splits_groups_and_what_shares_nothing_runs_alone():
    base = [job({"pruning.sparsity": s}, i) for i, s in enumerate((0.01, 0.02))]
    other_variant = [job({"alignment.name": "base", "pruning.sparsity": s}, 2 + i) for i, s in enumerate((0.01, 0.02))]
    other_store = [job({"scores.store": "dense", "pruning.sparsity": s}, 4 + i) for i, s in enumerate((0.01, 0.02))]
    other_cache = [job({"pruning.sparsity": s}, 6 + i, artifacts="/scratch/b") for i, s in enumerate((0.01, 0.02))]
    groups, alone = sweep_jobs.group_jobs(base + other_variant + other_store + other_cache)
    assert [[j.index for j in g.jobs] for g in groups] == [[0, 1], [2, 3], [4, 5], [6, 7]] and alone == []
    assert len({g.key for g in groups}) == 4

    experiments = [job({"experiment": "cross_harm", "pruning.sparsity": s}, i) for i, s in enumerate((0.01, 0.02))]
    no_cache = [job({"pruning.sparsity": s}, 2 + i, artifacts=None) for i, s in enumerate((0.01, 0.02))]
    single = [job({"alignment.name": "base"}, 4)]
    unknown = [sweep_jobs.Job(index=5, overrides=["pruning.sparsity=lots"], error="ValidationError")]
    groups, alone = sweep_jobs.group_jobs(experiments + no_cache + single + unknown)
    assert groups == [] and [j.index for j in alone] == [0, 1, 2, 3, 4, 5]


def test_prepare_overrides_run_the_first_job_as_a_prepare_stage_in_its_own_folder():
    (group,), _ = sweep_jobs.group_jobs([job({"pruning.sparsity": 0.01}, 0), job({"pruning.sparsity": 0.02}, 1)])
    group.jobs[0].overrides += ["stage=run", "hydra.sweep.subdir=x"]
    over = sweep_jobs.prepare_overrides(group)
    assert over[0] == "pruning.sparsity=0.01" and "stage=run" not in over and "hydra.sweep.subdir=x" not in over
    assert over[-3:] == ["stage=prepare", "prepare_scores=[benign@global@abs_signed,harm@global@abs_signed]",
                         f"hydra.sweep.subdir=.prepare/{group.key}"]  # fmt: skip
    assert sweep_jobs.is_prepare(over) and not sweep_jobs.is_prepare(group.jobs[1].overrides)


def test_a_prepared_group_needs_no_second_prepare_job(tmp_path):
    (group,), _ = sweep_jobs.group_jobs([job({"pruning.sparsity": 0.01}, 0), job({"pruning.sparsity": 0.02}, 1)])
    group.jobs[0].run_dir = group.jobs[1].run_dir = tmp_path / "run"
    assert not sweep_jobs.is_prepared(group)
    artifact = tmp_path / "scores.safetensors"
    artifact.write_text("x")
    group.prepare_dir.mkdir(parents=True)
    marker = group.prepare_dir / sweep_jobs.PREPARE_MARKER
    marker.write_text(json.dumps({"prepared_scores": group.kinds, "artifacts": {"scores_harm": str(artifact)}}))
    assert sweep_jobs.is_prepared(group)
    artifact.unlink()  # someone cleaned the cache: prepare again
    assert not sweep_jobs.is_prepared(group)
    artifact.write_text("x")
    group.kinds.append("harm_unsigned@global@unsigned")  # the relaunched group reads a set not prepared yet
    assert not sweep_jobs.is_prepared(group)


# ---------------------------------------------------------------- dependencies


def test_dependency_parameters_hold_runs_until_their_prepare_job_succeeded():
    assert hl.dependency_parameters({"requeue": True}, ["41"]) == {"requeue": True, "dependency": "afterok:41"}
    assert hl.dependency_parameters({}, ["41_0", "41_1"])["dependency"] == "afterok:41_0:41_1"
    # a dependency of the user's own (e.g. after another sweep) is kept: both must hold
    assert hl.dependency_parameters({"dependency": "afterany:7"}, ["41"])["dependency"] == "afterany:7,afterok:41"


def test_a_sweep_group_is_one_prepare_job_then_an_array_that_depends_on_it(hydra_ctx, tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    launcher = make_launcher(hydra_ctx, sweep, "hydra.launcher.name=grid")
    runs = [["pruning=signed_snip", "pruning.sparsity=0.01"], ["pruning=signed_snip", "pruning.sparsity=0.02"],
            ["pruning=random", "pruning.sparsity=0.01"], ["alignment=base", "pruning.sparsity=0.01"]]  # fmt: skip
    returns, executor = drive(launcher, runs, monkeypatch)
    prepare, group, alone = executor.arrays
    # 1. one prepare job for the three runs that share artifacts, named <name>-prepare, in .prepare/<key>
    assert prepare["parameters"]["name"] == "grid-prepare" and len(prepare["overrides"]) == 1
    assert "stage=prepare" in prepare["overrides"][0] and "prepare_scores=[benign@global@abs_signed," \
        "harm@global@abs_signed]" in prepare["overrides"][0]  # fmt: skip
    assert "dependency" not in prepare["parameters"]["slurm_additional_parameters"]
    # 2. the group's runs: one array that waits for it (afterok), with the profile's other sbatch options
    assert group["parameters"]["name"] == "grid" and group["nums"] == [0, 1, 2]
    assert group["parameters"]["slurm_additional_parameters"] == {"requeue": True, "dependency": "afterok:100_0"}
    # 3. a run alone (another alignment: other artifacts, a group of one): no prepare job, no dependency
    assert alone["nums"] == [3] and alone["parameters"]["slurm_additional_parameters"] == {"requeue": True}
    assert [r.return_value for r in returns] == ["ran 101_0", "ran 101_1", "ran 101_2", "ran 102_0"]
    prepare_dir = Path(str(sweep_jobs.compose_job(launcher.config, hydra_ctx, prepare["overrides"][0], 0).run_dir))
    assert prepare_dir.parent == sweep / ".prepare"


def test_the_prepare_folder_is_under_the_sweep_folder_whatever_the_run_subdir(hydra_ctx, tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    launcher = make_launcher(hydra_ctx, sweep, "hydra.sweep.subdir=${model.name}/${harmsweep_run_id:}")
    jobs = [sweep_jobs.compose_job(launcher.config, hydra_ctx, [*COMMON, f"pruning.sparsity={s}"], i)
            for i, s in enumerate((0.01, 0.02))]  # fmt: skip
    assert jobs[0].run_dir.parent == sweep / "tiny_llama"
    (group,), _ = sweep_jobs.group_jobs(jobs)
    _, executor = drive(launcher, [["pruning.sparsity=0.01"], ["pruning.sparsity=0.02"]], monkeypatch)
    actual = sweep_jobs.compose_job(launcher.config, hydra_ctx, executor.arrays[0]["overrides"][0], 0).run_dir
    assert actual == group.prepare_dir == sweep / ".prepare" / group.key


def test_a_failed_prepare_job_cancels_its_runs_and_fails_them_with_its_error(hydra_ctx, tmp_path, monkeypatch):
    launcher = make_launcher(hydra_ctx, tmp_path / "sweep")
    runs = [["pruning.sparsity=0.01"], ["pruning.sparsity=0.02"], ["alignment=base"]]
    returns, executor = drive(launcher, runs, monkeypatch, fail_prepare=True)
    _prepare, group, alone = executor.arrays
    assert all(j.cancelled for j in group["jobs"]) and not alone["jobs"][0].cancelled
    assert [r.status for r in returns] == [JobStatus.FAILED, JobStatus.FAILED, JobStatus.COMPLETED]
    with pytest.raises(RuntimeError, match=r"prepare job 100_0 of runs #0, #1 failed.*calibration file is broken"):
        _ = returns[0].return_value


def test_prepare_shared_false_submits_every_run_in_one_array(hydra_ctx, tmp_path, monkeypatch):
    launcher = make_launcher(hydra_ctx, tmp_path / "sweep", "hydra.launcher.prepare_shared=false")
    _, executor = drive(launcher, [["pruning.sparsity=0.01"], ["pruning.sparsity=0.02"]], monkeypatch)
    (array,) = executor.arrays
    assert array["nums"] == [0, 1] and "dependency" not in array["parameters"]["slurm_additional_parameters"]


def test_local_jobs_run_the_prepare_job_before_submitting_the_runs(hydra_ctx, tmp_path, monkeypatch):
    launcher = make_launcher(hydra_ctx, tmp_path / "sweep", profile="local_jobs")
    executor = FakeExecutor()
    waited: list[str] = []
    original = FakeJob.results

    def results(self):
        waited.append(self.job_id)
        return original(self)

    monkeypatch.setattr(FakeJob, "results", results)
    monkeypatch.setattr(launcher, "_executor", lambda: executor)
    monkeypatch.setattr(hl, "disk_problem", lambda *a, **k: None)
    launcher.launch([[*COMMON, "pruning.sparsity=0.01"], [*COMMON, "pruning.sparsity=0.02"]], 0)
    _prepare, runs = executor.arrays
    assert waited[0] == "100_0" and len(runs["nums"]) == 2  # the prepare job had ended when the runs were submitted
    assert "slurm_additional_parameters" not in runs["parameters"] or "dependency" not in str(runs["parameters"])


# ---------------------------------------------------------------- storage


def storage_job(artifacts: str, *overrides: str) -> sweep_jobs.Job:
    return sweep_jobs.Job(index=0, overrides=list(overrides), cfg={"paths": {"artifacts": artifacts}})


def test_default_artifacts_under_home_move_to_scratch_or_stop_the_sweep(tmp_path):
    home, scratch = tmp_path / "home", tmp_path / "scratch"
    default = storage_job(str(home / ".cache" / "harmsweep" / "artifacts"))
    assert storage.scratch_overrides([default], {"HOME": str(home), "SCRATCH": str(scratch)}) == [
        f"paths.artifacts={scratch}/harmsweep/artifacts"
    ]
    with pytest.raises(HarmsweepError, match=r"paths.artifacts would be .*under \$HOME.*export SCRATCH"):
        storage.scratch_overrides([default], {"HOME": str(home)})
    # given on the command line: taken as given; elsewhere than $HOME, or no shared cache: nothing to do
    explicit = storage_job(str(home / "big"), f"paths.artifacts={home / 'big'}")
    assert storage.scratch_overrides([explicit], {"HOME": str(home)}) == []
    assert storage.scratch_overrides([storage_job(str(tmp_path / "fast"))], {"HOME": str(home)}) == []
    assert (
        storage.scratch_overrides([sweep_jobs.Job(0, [], cfg={"paths": {"artifacts": None}})], {"HOME": str(home)})
        == []
    )


def test_the_driver_stops_in_one_line_before_submitting(hydra_ctx, tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SCRATCH", raising=False)
    monkeypatch.setenv("HARMSWEEP_CACHE", str(home / ".cache" / "harmsweep"))
    # the one-node test cluster keeps its cache in $HOME (its own disk): nothing to move, nothing refused
    _returns, executor = drive(make_launcher(hydra_ctx, tmp_path / "local"), [["pruning.sparsity=0.01"]], monkeypatch)
    assert not any(o.startswith("paths.artifacts=") for o in executor.arrays[0]["overrides"][0])
    launcher = make_launcher(hydra_ctx, tmp_path / "sweep", "hydra.launcher.artifacts_in_home=false")  # a real cluster
    executor = FakeExecutor()
    monkeypatch.setattr(launcher, "_executor", lambda: executor)
    with pytest.raises(SystemExit) as exit_info:
        launcher.launch([[*COMMON, "pruning.sparsity=0.01"]], 0)
    assert exit_info.value.code == 2 and executor.arrays == []
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("harmsweep: error: paths.artifacts would be") and "SCRATCH" in line

    # with SCRATCH, every job is told to use it (the run id does not change: paths are not part of it)
    monkeypatch.setenv("SCRATCH", str(tmp_path / "scratch"))
    _returns, executor = drive(launcher, [["pruning.sparsity=0.01"]], monkeypatch)
    assert executor.arrays[0]["overrides"][0][-1] == f"paths.artifacts={tmp_path}/scratch/harmsweep/artifacts"

    # a sweep that does not fit: plan's sizing says so, in one line, and nothing is submitted
    monkeypatch.setattr(
        hl, "disk_problem", lambda *a, **k: "the sweep writes 56.0 GiB of artifacts but /x has 1.0 GiB free"
    )
    executor = FakeExecutor()
    monkeypatch.setattr(launcher, "_executor", lambda: executor)
    with pytest.raises(SystemExit):
        launcher.launch([[*COMMON, "pruning.sparsity=0.02"]], 0)
    assert executor.arrays == [] and "56.0 GiB" in capsys.readouterr().err


def test_disk_problem_reuses_plan_sizing(monkeypatch, hydra_ctx):
    calls = []

    def build(argv):
        calls.append(argv)
        return {"disk": {"total": 3 * 2**30, "free": 2**30, "artifacts": "/scratch/a"}}, []

    import harmsweep.sweep.plan as sweep_plan

    monkeypatch.setattr(sweep_plan, "build", build)
    problem = storage.disk_problem(["model=llama3_8b", "pruning.sparsity=1e-6,1e-5"], ["paths.artifacts=/scratch/a"])
    assert problem.startswith("the sweep writes 3.0 GiB of artifacts but /scratch/a has 1.0 GiB free")
    assert calls == [["-m", "model=llama3_8b", "pruning.sparsity=1e-6,1e-5", "paths.artifacts=/scratch/a"]]
    assert GlobalHydra.instance().is_initialized()  # the driver's Hydra is back as it was

    monkeypatch.setattr(sweep_plan, "build", lambda argv: ({"disk": {"total": 1, "free": 2, "artifacts": "/a"}}, []))
    assert storage.disk_problem([]) is None

    def offline(argv):
        raise HarmsweepError("the config of meta-llama/x is not available offline")

    monkeypatch.setattr(sweep_plan, "build", offline)
    assert storage.disk_problem([]) is None  # sizing is advice: a sweep it cannot size is still submitted
    assert GlobalHydra.instance().is_initialized()


def test_disk_problem_with_the_real_plan(hydra_ctx, tmp_path, monkeypatch, caplog):
    """Through sweep/plan.build itself: a tiny sweep fits; the same sweep on a nearly full disk does not."""
    import harmsweep.sweep.plan as sweep_plan

    sweep = ["model=tiny_llama", "pruning.sparsity=0.01,0.02", f"paths.artifacts={tmp_path}"]
    assert storage.disk_problem(sweep) is None
    assert "could not size" not in caplog.text  # sized for real, not skipped
    assert GlobalHydra.instance().is_initialized()
    monkeypatch.setattr(sweep_plan, "_free_bytes", lambda path: 1)
    problem = storage.disk_problem(sweep)
    assert problem.startswith("the sweep writes") and f"but {tmp_path} has 0.0 MiB free" in problem


# ---------------------------------------------------------------- a real sweep through submitit_local


@pytest.mark.slow
def test_local_jobs_sweep_prepares_once_and_a_relaunch_starts_nothing(tmp_path):
    harmful, benign = write_pairs(tmp_path / "data", 12)
    sweep = tmp_path / "sweep"
    args = [
        "-m", "hydra/launcher=local_jobs", f"hydra.sweep.dir={sweep}",
        "model=tiny_llama", "calibration=file", f"calibration.harmful.file={harmful}",
        f"calibration.benign.file={benign}", "data.root=null", "eval=likelihood", "eval.benign_references=dataset",
        "calibration.n=6", "eval.n=4", "scores.keep=0.2", "pruning=signed_snip,random", "pruning.sparsity=0.01,0.02",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HARMSWEEP_CACHE": str(tmp_path / "cache")}
    proc = prewarmed.run("harmsweep.cli", args, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = [json.loads(p.read_text()) for p in sweep.glob("*/result.json")]
    assert len(done) == 4
    for result in done:  # every shared artifact came from the prepare job
        assert not any(result["computed"].values()), result["computed"]
    (marker,) = sweep.glob(".prepare/*/prepare.json")
    prepared = json.loads(marker.read_text())
    assert all(prepared["computed"].values()) and prepared["stage"] == "prepare"

    def jobs_started() -> int:
        return len(list((sweep / ".submitit").glob("*/*_submitted.pkl")))

    assert jobs_started() == 5  # one prepare job + four runs

    again = prewarmed.run("harmsweep.cli", args, cwd=tmp_path, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4 of 4 runs are done already" in again.stdout + again.stderr
    assert jobs_started() == 5  # no new job


# ---------------------------------------------------------------- the prepare stage itself


def test_the_prepare_stage_makes_what_its_runs_then_reuse(tmp_path):
    """``stage=prepare`` (what a prepare job runs) fills the cache; a run of its group then computes nothing."""
    harmful, benign = write_pairs(tmp_path / "data", 12)
    common = [
        "model=tiny_llama", "calibration=file", f"calibration.harmful.file={harmful}",
        f"calibration.benign.file={benign}", "data.root=null", "eval=likelihood", "eval.benign_references=dataset",
        "calibration.n=6", "eval.n=4", "scores.keep=0.2", f"paths.artifacts={tmp_path / 'artifacts'}",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HARMSWEEP_CACHE": str(tmp_path / "cache")}

    def harmsweep(*args: str) -> subprocess.CompletedProcess:
        return prewarmed.run("harmsweep.cli", [*common, *args], cwd=tmp_path, env=env)

    prep = harmsweep("stage=prepare", "prepare_scores=[harm@global@abs_signed,benign@global@abs_signed]",
                     f"hydra.run.dir={tmp_path / 'prepare'}")  # fmt: skip
    assert prep.returncode == 0, prep.stderr[-3000:]
    made = json.loads((tmp_path / "prepare" / "prepare.json").read_text())
    assert made["computed"] == {"calibration": True, "scores_benign@global@abs_signed": True,
                                "scores_harm@global@abs_signed": True, "eval_before": True}  # fmt: skip
    assert all(Path(p).is_file() for p in made["artifacts"].values())
    assert not (tmp_path / "prepare" / "result.json").exists()  # nothing pruned, no run result
    assert "experiment prepare" in prep.stdout

    run = harmsweep("pruning.sparsity=0.03", f"hydra.run.dir={tmp_path / 'run'}")
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["computed"] == {"calibration": False, "scores_benign": False, "scores_harm": False,
                                  "eval_before": False}  # fmt: skip
    assert result["artifacts"]["eval_before"] == made["artifacts"]["eval_before"]
    assert result["artifacts"]["scores_harm"] == made["artifacts"]["scores_harm@global@abs_signed"]
    log = (tmp_path / "run" / "app.log").read_text() if (tmp_path / "run" / "app.log").exists() else run.stdout
    assert "reusing calibration" in log + run.stderr and "reusing eval_before" in log + run.stderr

    bad = harmsweep("stage=later", f"hydra.run.dir={tmp_path / 'bad'}")
    assert bad.returncode == 2 and "stage=later is not one of run, prepare" in bad.stderr
