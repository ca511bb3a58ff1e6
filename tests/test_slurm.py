"""Multiruns on a real SLURM cluster: the single-node one of launchers/slurm-local.sh, on this machine.

The session fixture brings the cluster up (`launchers/slurm-local.sh up`: apt-get install on first use, then the
daemons; needs root). Where it cannot (not root, no apt-get, the start fails) the tests skip and say why; with
HARMSWEEP_REQUIRE_SLURM=1 (set by .ci/run) they fail instead. A cluster this fixture started is stopped again
at the end of the session; one that was already up is left as it was.

Every job gets a unique Slurm job name, so a test cancels exactly its own jobs if it fails midway.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import write_pairs

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
SLURM_LOCAL = ROOT / "launchers" / "slurm-local.sh"
DRIVER_TIMEOUT_S = 240


# ---------------------------------------------------------------- cluster


def _quiet(*cmd: str, timeout: float = 20) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(cmd, 1, "", str(exc))


def cluster_ready() -> bool:
    """A node that takes jobs, and sacct (submitit needs it to notice jobs that died without a result)."""
    if not shutil.which("sinfo") or "is UP" not in _quiet("scontrol", "ping").stdout:  # sinfo waits 9 s if it is down
        return False
    states = _quiet("sinfo", "-h", "-o", "%T").stdout.split()
    return any(s.rstrip("*~#$@") in ("idle", "mixed", "allocated") for s in states) and (
        _quiet("sacct", "-n", "-X", "-S", "now").returncode == 0
    )


def _unavailable(reason: str) -> None:
    message = f"local SLURM cluster unavailable: {reason}"
    if os.environ.get("HARMSWEEP_REQUIRE_SLURM") == "1":
        pytest.fail(message + " (HARMSWEEP_REQUIRE_SLURM=1)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[None]:
    if cluster_ready():
        yield
        return
    if os.geteuid() != 0:
        _unavailable(f"not running as root; start it as root with `{SLURM_LOCAL} up`, or run the tests as root")
    installed = shutil.which("slurmctld") or Path("/usr/sbin/slurmctld").exists()
    if not installed and not shutil.which("apt-get"):
        _unavailable("SLURM is not installed and there is no apt-get to install it (Debian/Ubuntu only)")
    was_running = "is UP" in _quiet("scontrol", "ping").stdout  # e.g. up, but its node still busy completing
    start = time.monotonic()
    proc = _quiet("bash", str(SLURM_LOCAL), "up", timeout=900)
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
    if proc.returncode != 0:
        _unavailable(f"`{SLURM_LOCAL} up` failed (exit {proc.returncode}):\n{tail}")
    if not cluster_ready():
        _unavailable(
            "the cluster runs but has no idle node or no working sacct (started with HS_SLURM_ACCOUNTING=0? "
            f"`{SLURM_LOCAL} restart`):\n{tail}"
        )
    print(f"\n[slurm] cluster started in {time.monotonic() - start:.1f}s")
    yield
    if not was_running:
        _quiet("bash", str(SLURM_LOCAL), "stop", timeout=120)


@pytest.fixture
def job_name(slurm_cluster) -> Iterator[str]:
    """A Slurm job name unique to this test; whatever is left of its jobs is cancelled afterwards.

    Prepare jobs (harmsweep/sweep/launcher.py) are named <name>-prepare: they are cleaned up too.
    """
    name = f"hstest-{uuid.uuid4().hex[:10]}"
    yield name
    names = f"{name},{name}-prepare"
    # a job may still be completing when its driver has its result: give it a moment before cancelling leftovers
    for _ in range(50):
        if not _quiet("squeue", "-h", f"--name={names}", "-o", "%i").stdout.strip():
            return
        time.sleep(0.2)
    _quiet("scancel", f"--name={names}")


def sacct_states(name: str, *, attempts: bool = False, expect: int | None = None) -> list[tuple[str, str, str]]:
    """(job id, state, exit code) of the jobs named `name`, oldest first; attempts=True adds requeued ones.

    Accounting lags the job's end by a moment: wait until `expect` records show a final state.
    """
    cmd = ["sacct", "-n", "-P", "-X", "-S", "now-1days", f"--name={name}", "-o", "JobID,State,ExitCode"]
    if attempts:
        cmd.insert(1, "-D")
    rows: list[tuple[str, str, str]] = []
    for _ in range(50):
        rows = [tuple(line.split("|")) for line in _quiet(*cmd).stdout.split()]  # type: ignore[misc]
        final = [r for r in rows if r[1] not in ("PENDING", "RUNNING", "COMPLETING", "REQUEUE_HOLD")]
        if expect is None or len(final) >= expect:
            break
        time.sleep(0.2)
    return rows


# ---------------------------------------------------------------- harmsweep multiruns


def run_args(harmful: Path, benign: Path, *extra: str) -> list[str]:
    return [
        "model=tiny_llama", "calibration=file", f"calibration.harmful.file={harmful}", f"calibration.benign.file={benign}",
        "data.root=null", "eval=likelihood", "eval.benign_references=dataset", "calibration.n=6", "eval.n=4",
        "pruning.sparsity=0.02", "scores.keep=0.2", *extra,
    ]  # fmt: skip


def driver_cmd(sweep_dir: Path, name: str, *overrides: str, launcher: str = "slurm_local") -> list[str]:
    return [
        sys.executable, "-m", "harmsweep.cli", "-m", f"hydra/launcher={launcher}", f"hydra.sweep.dir={sweep_dir}",
        f"hydra.launcher.name={name}", *overrides,
    ]  # fmt: skip


def driver_env(cache: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HARMSWEEP_CACHE": str(cache), "HYDRA_FULL_ERROR": "1"}


def multirun(sweep_dir: Path, name: str, *overrides: str, cache: Path, launcher: str = "slurm_local"):
    start = time.monotonic()
    proc = subprocess.run(
        driver_cmd(sweep_dir, name, *overrides, launcher=launcher),
        cwd=sweep_dir.parent,
        env=driver_env(cache),
        capture_output=True,
        text=True,
        timeout=DRIVER_TIMEOUT_S,
    )
    print(f"[slurm] multirun {sweep_dir.name}: {time.monotonic() - start:.1f}s, exit {proc.returncode}")
    return proc


def results(sweep_dir: Path) -> dict[str, dict]:
    """result.json of each finished run of a sweep, by run folder name."""
    return {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/result.json")}


def job_logs(sweep_dir: Path) -> str:
    """The jobs' own stdout/stderr (submitit writes them under <sweep>/.submitit), for failure messages."""
    logs = sorted((sweep_dir / ".submitit").glob("*/*_log.*"))
    return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in logs)


# ---------------------------------------------------------------- tests


def test_multirun_through_slurm_completes_every_job(tmp_path, job_name):
    """The plain job array (prepare_shared=false: no prepare job; the default is tested below)."""
    harmful, benign = write_pairs(tmp_path / "data", 12)
    sweep = tmp_path / "sweep"
    proc = multirun(
        sweep, job_name, *run_args(harmful, benign), "pruning=signed_snip,random",
        "hydra.launcher.prepare_shared=false", cache=tmp_path / "cache",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:] + job_logs(sweep)

    done = results(sweep)
    assert sorted(r["pruning"]["rule"] for r in done.values()) == ["random", "signed_snip"]
    for folder, result in done.items():
        assert folder == result["run_id"]  # hydra.sweep.subdir: the run id
        assert result["model"] == "tiny_llama"
        assert result["n_pruned"] == round(0.02 * result["n_scored"])
        assert {"nll_harmful_before", "nll_harmful_after", "nll_benign_before", "nll_benign_after"} <= set(
            result["metrics"]
        )
    # really dispatched by Slurm, as one job array of two tasks, with the profile's settings
    (script,) = (sweep / ".submitit").glob("*/*_submission.sh")
    text = script.read_text()
    assert "#SBATCH --partition=debug" in text and "#SBATCH --array=0-1%" in text and "#SBATCH --requeue" in text
    states = sacct_states(job_name, expect=2)
    assert [s[1:] for s in states] == [("COMPLETED", "0:0")] * 2, states
    assert all("_" in s[0] for s in states)  # array tasks <job>_<index>


def _artifacts(*folders: Path) -> dict[Path, int]:
    """Every stage artifact (safetensors, JSON) under the folders, with its modification time."""
    found = {}
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and path.suffix in (".safetensors", ".json", ".jsonl") and ".hydra" not in path.parts:
                found[path] = path.stat().st_mtime_ns
    return found


def _wait_for(predicate, timeout: float, what: str, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"driver exited (status {p.returncode}) while waiting for {what}")
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def test_requeued_job_resumes_from_finished_stages_with_the_same_result(tmp_path, job_name):
    """`scontrol requeue` kills a run after scoring; the requeued job reuses what was done and ends like a clean run.

    The evaluation (5000 held-out pairs, before and after pruning) keeps the run busy for ~15 s after the scores
    exist, longer than Slurm's 5 s from the requeue to SIGKILL (KillWait), so the run is cut off before result.json.
    """
    harmful, benign = write_pairs(tmp_path / "data", 5100)
    args = run_args(harmful, benign, "eval.n=5000")
    # the reference: the same config uninterrupted, beside it on the other CPU (own sweep folder and cache)
    ref_sweep, sweep = tmp_path / "reference", tmp_path / "requeued"
    ref_cache, cache = tmp_path / "cache_reference", tmp_path / "cache_requeued"
    procs = []
    for sw, ca, name in ((ref_sweep, ref_cache, f"{job_name}-ref"), (sweep, cache, job_name)):
        with open(tmp_path / f"{sw.name}.log", "w") as log:  # the driver keeps its own copy of the descriptor
            procs.append(
                subprocess.Popen(
                    driver_cmd(sw, name, *args), cwd=tmp_path, env=driver_env(ca), stdout=log, stderr=subprocess.STDOUT
                )
            )
    try:
        start = time.monotonic()
        _wait_for(
            lambda: any(cache.rglob("scores*.safetensors")) or any(sweep.glob("*/scores*.safetensors")),
            120,
            "the scores",
            procs,
        )
        assert not list(sweep.glob("*/result.json")), "the run finished before it could be requeued"
        (job_id,) = _quiet("squeue", "-h", f"--name={job_name}", "-o", "%i").stdout.split()
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=20)
        requeued = time.monotonic()
        # PENDING again: the first attempt's processes are gone (SIGKILL came KillWait after the requeue)
        _wait_for(
            lambda: _quiet("squeue", "-h", "-j", job_id, "-o", "%T").stdout.strip() == "PENDING",
            60,
            "the requeue",
            procs,
        )
        done_before = _artifacts(sweep, cache)
        assert not list(sweep.glob("*/result.json")), "the first attempt finished despite the requeue"
        for p in procs:
            p.wait(timeout=DRIVER_TIMEOUT_S)
        print(
            f"[slurm] requeue test: scores after {requeued - start:.1f}s, both drivers done after {time.monotonic() - start:.1f}s"
        )
    finally:
        if any(p.poll() is None for p in procs):  # the test failed midway: end the drivers and their jobs
            for p in procs:
                p.kill()
            _quiet("scancel", f"--name={job_name}-ref")
    logs = {sw.name: (tmp_path / f"{sw.name}.log").read_text()[-3000:] for sw in (ref_sweep, sweep)}
    assert [p.returncode for p in procs] == [0, 0], f"{logs}\n{job_logs(sweep)}"

    (result,) = results(sweep).values()
    (reference,) = results(ref_sweep).values()
    assert result["run_id"] == reference["run_id"]
    assert result["metrics"] == reference["metrics"]
    assert result["n_pruned"] == reference["n_pruned"] > 0

    # what the first attempt finished was reused as it was, not recomputed
    assert any(p.name.startswith("scores") for p in done_before) and any(
        p.name == "mask.safetensors" for p in done_before
    )
    changed = [str(p) for p, mtime in done_before.items() if p.stat().st_mtime_ns != mtime]
    assert not changed, f"rewritten after the requeue: {changed}"
    # The finishing attempt computed none of what the first attempt had finished (calibration and
    # scores exist at the requeue); the unpruned evaluation may still have been under way then.
    finished_first = {k: v for k, v in result["computed"].items() if k.startswith(("calibration", "scores"))}
    assert finished_first and not any(finished_first.values()), result["computed"]

    # Slurm's view: the same job id ran twice, first requeued, then completed
    attempts = sacct_states(job_name, attempts=True, expect=2)
    assert [s[1] for s in attempts] == ["REQUEUED", "COMPLETED"], attempts
    assert {s[0] for s in attempts} == {job_id}


def test_a_job_that_fails_inside_slurm_fails_the_multirun(tmp_path, job_name):
    """A calibration file that exists (so composing the sweep passes) but is not JSON fails only inside its job."""
    harmful, benign = write_pairs(tmp_path / "data", 12)
    broken = tmp_path / "data" / "broken.jsonl"
    broken.write_text("this is not JSON\n")
    sweep = tmp_path / "sweep"
    overrides = [a for a in run_args(harmful, benign) if not a.startswith("calibration.harmful.file=")]
    proc = multirun(
        sweep, job_name, *overrides, f"calibration.harmful.file={harmful},{broken}", cache=tmp_path / "cache"
    )

    assert proc.returncode != 0
    assert "malformed JSON" in proc.stderr, proc.stderr[-3000:]  # the job's error reaches the driver's output
    (good,) = results(sweep).values()  # the other job of the sweep still finished
    assert good["config"]["calibration"]["harmful"]["file"] == str(harmful)
    (bad_folder,) = [p for p in sweep.iterdir() if p.is_dir() and p.name != good["run_id"] and p.name != ".submitit"]
    assert not (bad_folder / "result.json").exists()
    assert "malformed JSON" in (bad_folder / "FAILED").read_text()  # the run folder says it failed, and why
    # Hydra catches the job's exception inside the job and hands it to the driver, so Slurm records COMPLETED
    # (FAILED if the job exited non-zero instead): the FAILED file and the driver's status are what tell.
    states = sorted(s[1] for s in sacct_states(job_name, expect=2))
    assert states in (["COMPLETED", "COMPLETED"], ["COMPLETED", "FAILED"]), states


def test_gpu_profile_is_accepted_by_slurm(tmp_path, job_name):
    """hydra/launcher=slurm_gpu against the local cluster's fake GPUs (partition gpu): one GPU per run."""
    if "gpu" not in _quiet("sinfo", "-h", "-o", "%R").stdout.split():
        pytest.skip("the local cluster has no 'gpu' partition (started with HS_SLURM_GPUS=0)")
    harmful, benign = write_pairs(tmp_path / "data", 12)
    sweep = tmp_path / "sweep"
    proc = multirun(
        sweep, job_name, *run_args(harmful, benign), "hydra.launcher.partition=gpu", "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=3", "hydra.launcher.timeout_min=10", cache=tmp_path / "cache", launcher="slurm_gpu",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:] + job_logs(sweep)
    assert len(results(sweep)) == 1
    (script,) = (sweep / ".submitit").glob("*/*_submission.sh")
    assert "#SBATCH --gpus-per-node=1" in script.read_text()
    tres = _quiet("sacct", "-n", "-P", "-X", "-S", "now-1days", f"--name={job_name}", "-o", "AllocTRES").stdout
    assert "gres/gpu=1" in tres, tres


# ---------------------------------------------------------------- no idle GPUs: prepare jobs, relaunches


def sacct_jobs(name: str, expect: int) -> list[dict[str, str]]:
    """Every job of a test (its runs and its <name>-prepare jobs), oldest first, once `expect` of them ended."""
    cmd = ["sacct", "-n", "-P", "-X", "-S", "now-1days", f"--name={name},{name}-prepare", "-o",
           "JobID,JobName,State,Submit,Start,End"]  # fmt: skip
    keys = ("id", "name", "state", "submit", "start", "end")
    rows: list[dict[str, str]] = []
    for _ in range(50):
        rows = [dict(zip(keys, line.split("|"), strict=True)) for line in _quiet(*cmd).stdout.split()]
        if sum(r["state"] == "COMPLETED" for r in rows) >= expect:
            break
        time.sleep(0.2)
    return rows


def _run_logs(sweep: Path) -> dict[str, str]:
    """Each job's submitit log (stdout + stderr), by job id."""
    logs: dict[str, str] = {}
    for path in sorted((sweep / ".submitit").glob("*/*_log.*")):  # .err and .out: both, not whichever came last
        job_id = path.name.split("_log")[0]
        logs[job_id] = logs.get(job_id, "") + path.read_text()
    return logs


def test_a_sweep_group_starts_after_its_prepare_job_and_waits_on_no_lock(tmp_path, job_name):
    """Four runs that differ only in pruning.*: one <name>-prepare job makes calibration, scores and the unpruned
    evaluation; the four runs are an array that Slurm starts only after it ended (afterok), and reuse all of it."""
    harmful, benign = write_pairs(tmp_path / "data", 12)
    sweep = tmp_path / "sweep"
    proc = multirun(
        sweep, job_name, *run_args(harmful, benign), "pruning=signed_snip,random", "pruning.sparsity=0.01,0.02",
        cache=tmp_path / "cache",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:] + job_logs(sweep)
    done = results(sweep)
    assert len(done) == 4
    for result in done.values():  # nothing shared was computed by a run: the prepare job made it all
        assert result["computed"] and not any(result["computed"].values()), result["computed"]
    (marker,) = sweep.glob(".prepare/*/prepare.json")
    prepared = json.loads(marker.read_text())
    assert all(prepared["computed"].values()) and prepared["prepared_scores"] == [
        "benign@global@abs_signed", "harm@global@abs_signed"]  # fmt: skip

    jobs = sacct_jobs(job_name, expect=5)
    prepare = [j for j in jobs if j["name"] == f"{job_name}-prepare"]
    runs = [j for j in jobs if j["name"] == job_name]
    assert len(prepare) == 1 and len(runs) == 4, jobs
    assert all(j["state"] == "COMPLETED" for j in jobs), jobs
    for run in runs:  # Slurm started no run before the prepare job had ended
        assert run["start"] >= prepare[0]["end"], jobs
    print("[slurm] sacct:\n" + "\n".join("|".join(j.values()) for j in jobs))
    scripts = {p.read_text() for p in (sweep / ".submitit").glob("*/*_submission.sh")}
    (array,) = [t for t in scripts if "#SBATCH --array=0-3%" in t]
    assert f"#SBATCH --dependency=afterok:{prepare[0]['id']}" in array and "#SBATCH --requeue" in array
    assert f"#SBATCH --job-name={job_name}-prepare" in "".join(scripts)

    logs = _run_logs(sweep)
    run_logs = [text for job_id, text in logs.items() if job_id.split("_")[0] == runs[0]["id"].split("_")[0]]
    assert len(run_logs) >= 4
    joined = "\n".join(run_logs)
    assert "computed concurrently" not in joined  # no run waited on another's lock
    for artifact in ("reusing calibration", "reusing eval_before", "reusing scores_harm"):
        assert artifact in joined, joined[-3000:]


def test_relaunching_a_finished_sweep_submits_no_job(tmp_path, job_name):
    harmful, benign = write_pairs(tmp_path / "data", 12)
    sweep = tmp_path / "sweep"
    args = (*run_args(harmful, benign), "pruning=signed_snip,random", "pruning.sparsity=0.01,0.02")
    first = multirun(sweep, job_name, *args, cache=tmp_path / "cache")
    assert first.returncode == 0, first.stderr[-3000:] + job_logs(sweep)
    before = sacct_jobs(job_name, expect=5)
    assert len(before) == 5  # a prepare job and four runs

    start = time.monotonic()
    again = multirun(sweep, job_name, *args, cache=tmp_path / "cache")
    seconds = time.monotonic() - start
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4 of 4 runs are done already: not submitted" in again.stdout + again.stderr
    time.sleep(1)
    assert sacct_jobs(job_name, expect=5) == before  # Slurm saw no new job
    print(f"[slurm] relaunch of a finished 4-run sweep: {seconds:.1f}s, no job")

    # one run removed: only it is submitted again, alone (its group's artifacts are still prepared)
    (victim,) = [p for p in results(sweep) if results(sweep)[p]["pruning"]["rule"] == "random"][:1]
    for path in (sweep / victim).glob("result.json"):
        path.unlink()
    third = multirun(sweep, job_name, *args, cache=tmp_path / "cache")
    assert third.returncode == 0, third.stderr[-3000:]
    after = sacct_jobs(job_name, expect=6)
    assert len(after) == 6 and after[-1]["name"] == job_name, after
    assert len(results(sweep)) == 4
