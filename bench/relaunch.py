"""Sweeps that hold no GPU idle: relaunching a finished sweep, and lock waits on shared artifacts, before vs after.

Through the real CLI on the local SLURM cluster (launchers/slurm-local.sh up; --launcher slurm_local, the default
when it answers) or on submitit_local (--launcher local_jobs), tiny Llama, file calibration:

(a) relaunch: a --runs sweep (4 rules x sparsities) is run to the end once, then launched again as it was:
    - before: hydra.launcher.skip_done=false (every run submitted again, as before this launcher: each job
      starts, finds its result.json and returns it);
    - after: the default (done runs are not submitted).
    Wall time of the driver, jobs submitted (submitit job folders; on SLURM also sacct's count).
(b) lock wait: a --lock-runs sparsity sweep sharing one calibration, one score set and one unpruned evaluation
    (made expensive with --lock-eval-n held-out pairs), from an empty cache:
    - before: hydra.launcher.prepare_shared=false (every run starts at once; one computes each artifact
      under the cache's lock, the others wait, holding their allocation);
    - after: the default (one prepare job makes them, the runs start after it).
    Per run, the seconds spent in shared stages it did not compute (result.json timings of calibrate,
    score_*, evaluate_before where computed is false: lock wait plus the load itself), the runs that logged
    "computed concurrently" (they found the artifact only after waiting on the lock), the job-seconds
    allocated (sacct End - Start, summed over every job, prepare jobs included) and the sweep's wall time.
Writes outputs/bench/relaunch.json.

    python bench/relaunch.py [--launcher slurm_local|local_jobs] [--runs 16] [--lock-runs 4] [--lock-eval-n 3000]
        [--reps 1] [--parts relaunch lock]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import common

RULES = ("signed_snip", "random", "magnitude", "no_set_difference")
SHARED_STAGES = {"calibration": "calibrate", "eval_before": "evaluate_before"}  # + scores_<kind>: score_<kind>


def slurm_ready() -> bool:
    if not shutil.which("sacct"):
        return False
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    return "is UP" in ping.stdout and subprocess.run(["sacct", "-n", "-X", "-S", "now"], capture_output=True,
                                                      timeout=20).returncode == 0  # fmt: skip


def sacct(name: str) -> list[dict[str, str]]:
    """Every job named name or name-prepare, once none is pending or running."""
    cmd = ["sacct", "-n", "-P", "-X", "-S", "now-1days", f"--name={name},{name}-prepare", "-o",
           "JobID,JobName,State,Start,End"]  # fmt: skip
    rows: list[dict[str, str]] = []
    for _ in range(100):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout
        rows = [
            dict(zip(("id", "name", "state", "start", "end"), line.split("|"), strict=True)) for line in out.split()
        ]
        if all(r["state"] not in ("PENDING", "RUNNING", "COMPLETING") for r in rows):
            break
        time.sleep(0.2)
    return rows


def seconds(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def driver(args: list[str], env: dict[str, str], cwd: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "harmsweep.cli", "-m", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=1800)  # fmt: skip
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"harmsweep -m {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return wall


def submitted(sweep: Path) -> int:
    return len(list((sweep / ".submitit").glob("*/*_submitted.pkl")))


def relaunch(launcher: str, runs: int, reps: int, base: list[str], tmp: Path, env: dict[str, str], slurm: bool):
    sparsities = [f"{0.005 * (i + 1):g}" for i in range(max(1, runs // len(RULES)))]
    sweep, name = tmp / "relaunch", f"bench-{uuid.uuid4().hex[:8]}"
    args = [f"hydra/launcher={launcher}", f"hydra.sweep.dir={sweep}", f"hydra.launcher.name={name}", *base,
            f"pruning={','.join(RULES)}", f"pruning.sparsity={','.join(sparsities)}"]  # fmt: skip
    first = driver(args, env, tmp)
    n_runs = len(list(sweep.glob("*/result.json")))
    print(f"(a) first launch of the {n_runs}-run sweep: {first:.1f} s, {submitted(sweep)} jobs", flush=True)
    out: dict[str, Any] = {"runs": n_runs, "first_launch_s": first, "first_launch_jobs": submitted(sweep),
                           "command": "harmsweep -m " + " ".join(args)}  # fmt: skip
    for variant, extra in (("before", ["hydra.launcher.skip_done=false"]), ("after", [])):
        walls, jobs, sacct_jobs = [], [], []
        for _ in range(reps):
            jobs_before = submitted(sweep)
            acct_before = len(sacct(name)) if slurm else 0
            walls.append(driver([*args, *extra], env, tmp))
            jobs.append(submitted(sweep) - jobs_before)
            if slurm:
                sacct_jobs.append(len(sacct(name)) - acct_before)
            print(f"(a) relaunch {variant}: {walls[-1]:.1f} s, {jobs[-1]} jobs submitted", flush=True)
        out[variant] = {"wall_s": common.spread(walls), "jobs_submitted": jobs, "sacct_new_jobs": sacct_jobs,
                        "extra_overrides": extra}  # fmt: skip
    return out


def lock_wait(launcher: str, n: int, eval_n: int, base: list[str], tmp: Path, env: dict[str, str], slurm: bool):
    sparsities = [f"{0.005 * (i + 1):g}" for i in range(n)]
    out: dict[str, Any] = {"runs": n, "eval_n": eval_n}
    for variant, extra in (("before", ["hydra.launcher.prepare_shared=false"]), ("after", [])):
        sweep, name = tmp / f"lock-{variant}", f"bench-{uuid.uuid4().hex[:8]}"
        cache = tmp / f"cache-{variant}"  # an empty artifact cache: the shared stages are computed in this sweep
        args = [f"hydra/launcher={launcher}", f"hydra.sweep.dir={sweep}", f"hydra.launcher.name={name}", *base,
                f"paths.artifacts={cache}", f"eval.n={eval_n}", "pruning=signed_snip",
                f"pruning.sparsity={','.join(sparsities)}", *extra]  # fmt: skip
        wall = driver(args, env, tmp)
        results = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/result.json"))]
        waits = []
        for r in results:
            stages = {**SHARED_STAGES, **{k: "score_" + k.removeprefix("scores_") for k in r["computed"] if
                                          k.startswith("scores_")}}  # fmt: skip
            waits.append(sum(r["timings_s"].get(stage, 0.0) for name_, stage in stages.items()
                             if not r["computed"].get(name_, True)))  # fmt: skip
        logs = [p.read_text() for p in (sweep / ".submitit").glob("*/*_log.out")]  # each job's log (cache.py logs
        waited_on_lock = sum("computed concurrently" in text for text in logs)  # "(computed concurrently)" on waits)
        computed_by_runs = sum(sum(r["computed"].values()) for r in results)
        row: dict[str, Any] = {"wall_s": wall, "reused_stage_s_per_run": waits, "reused_stage_s_total": sum(waits),
                               "logs_with_lock_wait": waited_on_lock, "artifacts_computed_by_runs": computed_by_runs,
                               "command": "harmsweep -m " + " ".join(args)}  # fmt: skip
        if slurm:
            jobs = sacct(name)
            row["sacct"] = jobs
            row["job_seconds"] = sum(seconds(j["start"], j["end"]) for j in jobs if j["end"] != "Unknown")
            prepare = [j for j in jobs if j["name"].endswith("-prepare")]
            runs = [j for j in jobs if not j["name"].endswith("-prepare")]
            if prepare:
                row["runs_started_after_prepare_ended"] = all(r["start"] >= prepare[0]["end"] for r in runs)
            first_start = min(j["start"] for j in jobs)
            row["run_start_delays_s"] = [seconds(first_start, r["start"]) for r in runs]
        print(f"(b) lock wait {variant}: wall {wall:.1f} s, reused-stage seconds {sum(waits):.2f} "
              f"({', '.join(f'{w:.2f}' for w in waits)}), {waited_on_lock} job logs with a lock wait", flush=True)  # fmt: skip
        out[variant] = row
    return out


def main() -> None:
    p = common.parser(__doc__, "relaunch", n=6, reps=1)
    p.set_defaults(model="tiny_llama")
    p.add_argument("--launcher", choices=("slurm_local", "local_jobs"), default=None)
    p.add_argument("--runs", type=int, default=16, help="runs of the relaunched sweep (4 rules x runs/4 sparsities)")
    p.add_argument("--lock-runs", type=int, default=4)
    p.add_argument("--lock-eval-n", type=int, default=3000, help="held-out pairs: makes eval_before take seconds")
    p.add_argument("--parts", nargs="+", default=["relaunch", "lock"], choices=("relaunch", "lock"))
    args = p.parse_args()
    slurm_up = slurm_ready()
    launcher = args.launcher or ("slurm_local" if slurm_up else "local_jobs")
    slurm = launcher.startswith("slurm")
    if slurm and not slurm_up:
        sys.exit("the local SLURM cluster is not up: sudo bash launchers/slurm-local.sh up (or --launcher local_jobs)")
    record: dict[str, Any] = {"benchmark": "relaunch", "machine": common.machine(), "launcher": launcher,
                              "model": args.model}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-relaunch-") as name:
        tmp = Path(name)
        harmful, benign = common.pair_files(tmp / "data", max(args.n, 6) + args.lock_eval_n + 8)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HARMSWEEP_CACHE": str(tmp / "cache"),
               "TQDM_DISABLE": "1"}  # fmt: skip
        env.pop("SCRATCH", None)
        base = [f"model={args.model}", "calibration=file", f"calibration.harmful.file={harmful}",
                f"calibration.benign.file={benign}", f"calibration.n={args.n}", "eval.n=4", "eval=likelihood",
                "eval.benign_references=dataset", "data.root=null", "scores.keep=0.2"]  # fmt: skip
        if "relaunch" in args.parts:
            record["relaunch"] = relaunch(launcher, args.runs, args.reps, base, tmp, env, slurm)
        if "lock" in args.parts:
            record["lock_wait"] = lock_wait(launcher, args.lock_runs, args.lock_eval_n, base, tmp, env, slurm)

    print(f"\nlauncher {launcher}, model {args.model}, {common.machine()['cpus']} CPUs")
    if "relaunch" in record:
        r = record["relaunch"]
        rows = [[f"relaunch {v}", f"{r[v]['wall_s']['median']:.1f}", str(r[v]["jobs_submitted"]),
                 str(r[v]["sacct_new_jobs"] or "-")] for v in ("before", "after")]  # fmt: skip
        print(f"(a) relaunching a finished {r['runs']}-run sweep (first launch {r['first_launch_s']:.1f} s)")
        print(common.table(["variant", "wall s", "jobs submitted", "sacct new jobs"], rows))
    if "lock_wait" in record:
        lw = record["lock_wait"]
        rows = [[f"lock {v}", f"{lw[v]['wall_s']:.1f}", f"{lw[v]['reused_stage_s_total']:.2f}",
                 str(lw[v]["logs_with_lock_wait"]), str(lw[v]["artifacts_computed_by_runs"]),
                 f"{lw[v].get('job_seconds', float('nan')):.0f}",
                 str(lw[v].get("runs_started_after_prepare_ended", "-"))] for v in ("before", "after")]  # fmt: skip
        print(f"(b) {lw['runs']} runs sharing one key (eval_before on {lw['eval_n']} pairs), from an empty cache")
        print(common.table(["variant", "wall s", "reused-stage s (sum)", "lock waits", "computed by runs",
                            "job-s", "runs after prepare"], rows))  # fmt: skip
    common.write(args.out, record)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
