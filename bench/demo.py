"""`make demo` wall time: warm (everything cached: every run done) and, with --cold, from scratch.

The demo's two commands (the Makefile's `demo` recipe without its venv step):
    harmsweep -m experiment=demo hydra.sweep.dir=DIR && harmsweep-report DIR
Warm (default): DIR = outputs/demo and the usual HARMSWEEP_CACHE. A first run primes them (it is
cold if the demo never ran; its time is reported, not counted as warm), then --reps warm runs are
timed; goal < 1 min. Every result.json must be left untouched by a warm run (checked).
Cold (--cold, not part of `make bench`: ~10 min on 2 quiet cores): a fresh HARMSWEEP_CACHE in a temporary
folder (model conversion, derived model training, all runs) and a fresh output folder, timed, then
the warm runs on the same folders; goal <= 15 min after install. The cold run's report is kept in
outputs/bench/demo_cold_report/ (compare it with docs/demo/), and where its time went is recorded (``stages_s``:
each stage summed over the runs' result.json timings; the derivation's own wall time and check).
Writes JSON to outputs/bench/demo.json (demo_cold.json with --cold).

    python bench/demo.py [--reps 2] [--cold]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

COLD_GOAL_S = 15 * 60
WARM_GOAL_S = 60


def demo(folder: Path, env: dict[str, str]) -> float:
    """Both demo commands; returns their wall time."""
    bin_dir = Path(sys.executable).parent
    start = time.perf_counter()
    for cmd in ([str(bin_dir / "harmsweep"), "-m", "experiment=demo", f"hydra.sweep.dir={folder}"],
                [str(bin_dir / "harmsweep-report"), str(folder)]):  # fmt: skip
        proc = subprocess.run(cmd, cwd=common.ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def stages(folder: Path, cache: Path) -> dict:
    """Where a cold run's time went: each stage summed over the runs, and the derived variant's training."""
    summed: dict[str, float] = {}
    for path in sorted(folder.glob("*/result.json")):
        for stage, seconds in json.loads(path.read_text()).get("timings_s", {}).items():
            summed[stage] = round(summed.get(stage, 0.0) + seconds, 1)
    derived = {}
    for marker in sorted(cache.glob("derived/*/derivation.json")):
        record = json.loads(marker.read_text())
        derived[marker.parent.name] = {"wall_s": record.get("wall_s"), "steps": len(record.get("losses", [])),
                                       "check": record.get("check")}  # fmt: skip
    return {"runs_stages_s": summed, "derived": derived}


def stamps(folder: Path) -> dict[str, int]:
    return {str(f): f.stat().st_mtime_ns for f in folder.rglob("result.json")}


def main() -> None:
    p = common.parser(__doc__, "demo", reps=2)
    p.add_argument("--cold", action="store_true", help="also time a run from scratch (fresh cache and outputs)")
    args = p.parse_args()
    if args.cold and args.out.endswith("demo.json"):
        args.out = args.out[: -len("demo.json")] + "demo_cold.json"

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.setdefault("HARMSWEEP_DATA", common.data_root())
    record: dict = {"benchmark": "demo", "machine": common.machine()}
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
        if args.cold:
            env["HARMSWEEP_CACHE"] = f"{tmp}/cache"
            folder = Path(tmp) / "demo"
            first = demo(folder, env)
            record["cold_s"] = first
            record["cold_goal_met"] = first <= COLD_GOAL_S
            record["stages_s"] = stages(folder, Path(env["HARMSWEEP_CACHE"]))
            kept = Path(args.out).with_name("demo_cold_report")  # to compare with docs/demo after the folder goes
            shutil.copytree(folder / "report", kept, dirs_exist_ok=True)
            record["cold_report"] = str(kept)
            print(f"cold: {first:.0f} s", flush=True)
        else:
            folder = common.ROOT / "outputs" / "demo"
            first = demo(folder, env)
            record["priming_s"] = first
            print(f"priming run: {first:.1f} s", flush=True)
        before = stamps(folder)
        warm = []
        for _ in range(args.reps):
            warm.append(demo(folder, env))
            print(f"warm: {warm[-1]:.1f} s", flush=True)
        record.update({"folder": str(folder), "runs": len(before), "warm_s": warm, "warm": common.spread(warm),
                       "warm_reused_every_run": stamps(folder) == before,
                       "warm_goal_met": common.spread(warm)["median"] < WARM_GOAL_S})  # fmt: skip

    w = record["warm"]
    rows = []
    if args.cold:
        rows.append(["cold (fresh cache and outputs)", f"{record['cold_s']:.0f}", "-", "<= 900",
                     "met" if record["cold_goal_met"] else "NOT met"])  # fmt: skip
    else:
        rows.append(["priming run (not counted)", f"{record['priming_s']:.1f}", "-", "-", "-"])
    rows.append([f"warm ({args.reps} runs, all done)", f"{w['median']:.1f}", f"{w['min']:.1f}-{w['max']:.1f}", "< 60",
                 "met" if record["warm_goal_met"] else "NOT met"])  # fmt: skip
    print(f"\nmake demo ({record['runs']} runs in {record['folder']}); warm runs left every result untouched: "
          f"{record['warm_reused_every_run']}")  # fmt: skip
    print(common.table(["", "median s", "min-max", "goal s", ""], rows))
    common.write(args.out, record)


if __name__ == "__main__":
    main()
