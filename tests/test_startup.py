"""The command line's light paths import neither torch, transformers nor datasets (seconds of start-up each).

``--help``, ``--cfg job``, a typo'd override and the relaunch of a finished run: each runs in a fresh process under a
stub that reports, at exit, which of those packages ended up in sys.modules.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_pairs

HEAVY = ("torch", "transformers", "datasets")
STUB = (
    "import atexit, runpy, sys\n"
    f"atexit.register(lambda: print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr))\n"
    "sys.argv = ['harmsweep', *sys.argv[1:]]\n"
    "runpy.run_module('harmsweep.cli', run_name='__main__')\n"
)


def harmsweep(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    """``harmsweep *args`` in a fresh process: the finished process (the stub's line removed from stderr) and the
    heavy packages it imported."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HARMSWEEP_CACHE": str(cwd / "cache")}
    proc = subprocess.run([sys.executable, "-c", STUB, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    lines = proc.stderr.splitlines()
    report = [line for line in lines if line.startswith("HEAVY=")]
    assert len(report) == 1, proc.stderr
    proc.stderr = "\n".join(line for line in lines if not line.startswith("HEAVY="))
    return proc, [m for m in report[0].removeprefix("HEAVY=").split(",") if m]


def summary_lines(stdout: str) -> list[str]:
    """What the command prints of the run (its log lines, stamped ``[date time][logger]``, left out)."""
    return [line for line in stdout.splitlines() if not line.startswith("[")]


@pytest.mark.parametrize(
    ("args", "status", "says"),
    [
        (["--help"], 0, "pruning: magnitude, no_set_difference, orgad2026, random, signed_snip"),
        (["--cfg", "job", "pruning.sparsity=0.003"], 0, "sparsity: 0.003"),
        (["pruning.sparsty=1"], 2, "Key 'sparsty' not in 'PruningConfig'"),
        (["pruning=typo"], 2, "unknown pruning 'typo'"),
    ],
)
def test_light_paths_import_no_torch(tmp_path, args, status, says):
    proc, heavy = harmsweep(*args, cwd=tmp_path)
    assert proc.returncode == status, proc.stderr
    assert says in (proc.stdout if status == 0 else proc.stderr)
    assert heavy == []
    if status:  # one line, and no run folder left behind
        assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "outputs").exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, list[str], str]:
    """One tiny run, finished: its folder, its overrides and what it printed."""
    folder = tmp_path_factory.mktemp("startup")
    harmful, benign = write_pairs(folder, 12)
    args = [
        "model=tiny_llama", "calibration=file", f"calibration.harmful.file={harmful}",
        f"calibration.benign.file={benign}", "calibration.n=6", "eval.n=4", "eval.benign_references=dataset",
        "pruning.sparsity=0.02", "scores.keep=0.2", "data.root=null", f"hydra.run.dir={folder / 'run'}",
    ]  # fmt: skip
    proc, heavy = harmsweep(*args, cwd=folder)
    assert proc.returncode == 0, proc.stderr
    assert "torch" in heavy  # the run itself needs it: the stub sees what a process imported
    return folder, args, proc.stdout


def test_relaunching_a_finished_run_prints_its_summary_without_torch(finished_run):
    folder, args, first = finished_run
    run_dir = folder / "run"
    result = (run_dir / "result.json").read_bytes()
    stamp = (run_dir / "result.json").stat().st_mtime_ns
    (run_dir / "FAILED").write_text("{}")  # an earlier failed attempt: a relaunch clears it, as the pipeline does
    proc, heavy = harmsweep(*args, cwd=folder)
    assert proc.returncode == 0, proc.stderr
    assert heavy == []
    lines = summary_lines(proc.stdout)
    assert lines == summary_lines(first) and lines[-1] == f"  results in {run_dir}"
    assert lines[0].startswith(f"run {json.loads(result)['run_id']}: tiny_llama (aligned), rule signed_snip")
    assert (run_dir / "result.json").read_bytes() == result and (run_dir / "result.json").stat().st_mtime_ns == stamp
    assert not (run_dir / "FAILED").exists()


def test_a_folder_holding_another_run_is_still_refused(finished_run):
    folder, args, _ = finished_run
    run_dir = folder / "run"
    result = (run_dir / "result.json").read_bytes()
    stored = json.loads((run_dir / "run.json").read_text())["run_id"]
    files = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run_dir.rglob("*")) if p.is_file()}
    other = [a if not a.startswith("pruning.sparsity=") else "pruning.sparsity=0.03" for a in args]
    proc, _ = harmsweep(*other, cwd=folder)
    assert proc.returncode == 2
    assert f"holds run {stored}, not this config's run" in proc.stderr
    assert (run_dir / "result.json").read_bytes() == result
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run_dir.rglob("*")) if p.is_file()}
    assert after == files  # refused before Hydra wrote its .hydra/ files: every file as it was, no FAILED added
