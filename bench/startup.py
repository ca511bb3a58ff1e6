"""Start-up of the command line: the added seconds over ``python -c pass``, and what each path imports.

    python bench/startup.py [--reps 5] [--against DIR] [--sweep-dir DIR] [--runs 16]

Times, each against ``python -c pass`` (the added start-up is the median minus that of ``pass``):
``harmsweep --help``, ``harmsweep --cfg job``, a typo'd override (exit status 2), importing the launcher plugin (as
Hydra does on every start), and a relaunch of a finished ``--runs`` sweep (4 sparsities x ``--runs``/4 rules, tiny
Llama, file calibration) on the default launcher, whose every job finds its result.json: answered from the sweep's
manifest (harmsweep/sweep/manifest.py), and without it (``no manifest``: every job composed, as after an edited config
file). The sweep is run to the end
once first, in ``--sweep-dir`` (kept, and reused when it is finished already) or a temporary folder. ``--against
DIR`` times another checkout of harmsweep the same way (its folder goes first on PYTHONPATH), alternating with this
one. Each path also runs once under a stub that lists which of torch, transformers and datasets it imported: none of
these paths may import them. Writes outputs/bench/startup.json.
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

HEAVY = ("torch", "transformers", "datasets")
RULES = ("signed_snip", "random", "magnitude", "no_set_difference")
SPARSITIES = ("0.01", "0.02", "0.03", "0.04")
# runs the harmsweep command line in this process, then prints the heavy packages it imported (exit included)
STUB = (
    "import atexit, runpy, sys\n"
    f"atexit.register(lambda: print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr))\n"
    "sys.argv = ['harmsweep', *sys.argv[1:]]\n"
    "runpy.run_module('harmsweep.cli', run_name='__main__')\n"
)


def sweep_args(folder: Path, runs: int) -> list[str]:
    """The sweep's overrides: tiny Llama on pair files, ``runs`` jobs (4 sparsities x runs / 4 rules)."""
    harmful, benign = folder / "harmful.jsonl", folder / "benign.jsonl"
    return [
        "-m", "model=tiny_llama", "calibration=file", f"calibration.harmful.file={harmful}",
        f"calibration.benign.file={benign}", "calibration.n=6", "eval.n=4", "eval.benign_references=dataset",
        "scores.keep=0.2", "data.root=null", f"pruning.sparsity={','.join(SPARSITIES)}",
        f"pruning.rule={','.join(RULES[: max(1, runs // len(SPARSITIES))])}", f"hydra.sweep.dir={folder / 'out'}",
    ]  # fmt: skip


def entries(folder: Path, runs: int) -> dict[str, tuple[list[str], int]]:
    """Name -> (python arguments, expected exit status)."""
    cli = ["-m", "harmsweep.cli"]
    return {
        "python -c pass": (["-c", "pass"], 0),
        "harmsweep --help": ([*cli, "--help"], 0),
        "harmsweep --cfg job": ([*cli, "--cfg", "job"], 0),
        "typo'd override (exit 2)": ([*cli, "pruning.sparsty=1"], 2),
        "import the launcher plugin": (["-c", "import hydra_plugins.harmsweep_launcher.harmsweep_launcher"], 0),
        f"relaunch a done {runs}-run sweep, no manifest": ([*cli, *sweep_args(folder, runs)], 0),
        f"relaunch a done {runs}-run sweep": ([*cli, *sweep_args(folder, runs)], 0),
    }


def forget_manifest(name: str, folder: Path) -> None:
    """Before a ``no manifest`` path: the sweep's manifests removed, so the relaunch composes and checks every job (as
    after an edit to a config file); that relaunch writes them again, for the path after it."""
    if name.endswith("no manifest"):
        shutil.rmtree(folder / "out" / ".harmsweep", ignore_errors=True)


def _env(tree: Path | None, folder: Path) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HARMSWEEP_CACHE": str(folder / "cache")}
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(tree), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _run(args: list[str], tree: Path | None, folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=_env(tree, folder), cwd=tree or common.ROOT,
                          capture_output=True, text=True, timeout=3600)  # fmt: skip


def seconds(args: list[str], status: int, tree: Path | None, folder: Path) -> float:
    start = time.perf_counter()
    proc = _run(args, tree, folder)
    elapsed = time.perf_counter() - start
    if proc.returncode != status:
        raise SystemExit(f"{' '.join(args[:4])}...: exit {proc.returncode}, expected {status}\n{proc.stderr[-2000:]}")
    return elapsed


def heavy(args: list[str], tree: Path | None, folder: Path) -> list[str]:
    """The heavy packages the path imports: the harmsweep command under STUB, a ``-c`` snippet with a check."""
    if args[:2] == ["-m", "harmsweep.cli"]:
        proc = _run(["-c", STUB, *args[2:]], tree, folder)
        lines = [line for line in proc.stderr.splitlines() if line.startswith("HEAVY=")]
        return [m for m in lines[-1].removeprefix("HEAVY=").split(",") if m] if lines else ["(no report)"]
    code = f"{args[1]}\nimport sys; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    return [m for m in _run(["-c", code], tree, folder).stdout.strip().split(",") if m]


def make_sweep(folder: Path, runs: int) -> None:
    """Run the sweep to the end once (skipped when every run of it holds result.json)."""
    done = sorted((folder / "out").glob("*/result.json"))
    if len(done) >= runs:
        return
    common.pair_files(folder, 12)
    print(f"running the {runs}-run sweep once in {folder} (minutes)", flush=True)
    proc = _run(["-m", "harmsweep.cli", *sweep_args(folder, runs)], None, folder)
    if proc.returncode != 0:
        raise SystemExit(f"the sweep failed:\n{proc.stderr[-3000:]}")


def main() -> None:
    p = common.parser(__doc__, "startup", reps=5)
    p.add_argument("--against", type=Path, default=None, help="another checkout to time the same way")
    p.add_argument("--sweep-dir", type=Path, default=None, help="where the finished sweep is made (kept) or found")
    p.add_argument("--runs", type=int, default=16, help="runs of the relaunched sweep (4 sparsities x runs/4 rules)")
    args = p.parse_args()
    folder = (args.sweep_dir or Path(tempfile.mkdtemp(prefix="harmsweep-startup-"))).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    make_sweep(folder, args.runs)
    runs_before = sorted(p.name for p in (folder / "out").iterdir() if (p / "result.json").is_file())
    trees = {"this": None, **({"against": args.against.resolve()} if args.against else {})}
    paths = entries(folder, args.runs)
    times: dict[str, dict[str, list[float]]] = {name: {t: [] for t in trees} for name in paths}
    for _ in range(args.reps):
        for name, (argv, status) in paths.items():
            for label, tree in trees.items():  # alternated, so load on the machine hits both alike
                if label == "this":  # (the other checkout neither reads nor writes one)
                    forget_manifest(name, folder)
                times[name][label].append(seconds(argv, status, tree, folder))
    runs_after = sorted(p.name for p in (folder / "out").iterdir() if (p / "result.json").is_file())
    if runs_after != runs_before:
        raise SystemExit("a relaunch ran new runs (another run id in the --against checkout?): not a relaunch")
    record: dict = {"machine": common.machine(), "reps": args.reps, "sweep": str(folder), "results": {}}
    base = {label: common.spread(times["python -c pass"][label])["median"] for label in trees}
    rows = []
    for name, (argv, _) in paths.items():
        entry = {}
        for label, tree in trees.items():
            if label == "this":
                forget_manifest(name, folder)
            median = common.spread(times[name][label])["median"]
            entry[label] = {**common.spread(times[name][label]), "added": median - base[label],
                            "heavy_imports": heavy(argv, tree, folder)}  # fmt: skip
        record["results"][name] = entry
        row = [name, entry["this"]["median"], entry["this"]["added"]]
        if args.against:
            row += [entry["against"]["median"], entry["against"]["added"]]
        rows.append(row + [",".join(entry[label]["heavy_imports"]) or "-" for label in trees])
    headers = ["path", "this (s)", "this added (s)"]
    headers += ["against (s)", "against added (s)"] if args.against else []
    headers += [f"{label} imports" for label in trees]
    print(common.table(headers, rows))
    print(json.dumps({"sweep": str(folder)}))
    common.write(args.out, record)


if __name__ == "__main__":
    main()
