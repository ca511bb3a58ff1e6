"""launchers/submit_detached.sh and launchers/wandb_sync.sh work from the folder they are called in (a researcher's
own project), not only from the checkout: relative paths in overrides mean what they mean there."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ROOT, write_pairs

LAUNCHERS = ROOT / "launchers"


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HARMSWEEP_CACHE": str(tmp_path / "cache")}


def test_wandb_sync_looks_in_the_callers_outputs(tmp_path):
    run = tmp_path / "outputs" / "sweeps" / "s" / "abc" / "wandb" / "offline-run-20261204_000000-abc"
    run.mkdir(parents=True)
    proc = subprocess.run([str(LAUNCHERS / "wandb_sync.sh"), "--dry-run"], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"1 offline run folder(s) under {tmp_path / 'outputs'}" in proc.stdout and str(run) in proc.stdout


@pytest.mark.slow  # a detached tiny sweep in a fresh interpreter, then its relaunch
def test_submit_detached_runs_a_sweep_from_the_callers_folder(tmp_path):
    write_pairs(tmp_path, 12)  # harmful.jsonl, benign.jsonl: named relative to tmp_path below
    overrides = [
        "model=tiny_llama", "calibration=file", "calibration.harmful.file=harmful.jsonl",
        "calibration.benign.file=benign.jsonl", "calibration.n=6", "eval.n=4", "eval.benign_references=dataset",
        "scores.keep=0.2", "data.root=null", "pruning.sparsity=0.01,0.02",
    ]  # fmt: skip
    script = [str(LAUNCHERS / "submit_detached.sh"), "--name", "mine", *overrides]
    proc = subprocess.run(script, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    sweep = tmp_path / "outputs" / "sweeps" / "mine"
    assert f"sweep:  {sweep}" in proc.stdout
    rc = Path(f"{sweep}.driver.rc")
    deadline = time.time() + 300
    while not rc.is_file() and time.time() < deadline:
        time.sleep(0.5)
    assert rc.read_text().strip() == "0", Path(f"{sweep}.driver.log").read_text()[-3000:]
    assert len(list(sweep.glob("*/result.json"))) == 2
    pid = int(Path(f"{sweep}.driver.pid").read_text())
    while _alive(pid) and time.time() < deadline:  # the wrapper writes the status just before it ends
        time.sleep(0.1)
    again = subprocess.run(script, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "sweep driver finished already (status 0)" in again.stdout, again.stderr


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
