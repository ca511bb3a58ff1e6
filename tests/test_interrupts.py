"""Ctrl-C and SIGTERM: one line naming the stage reached, INTERRUPTED in the run folder, exit 130 / 143, and a
relaunch resumes to the same result."""

from __future__ import annotations

import json
import os
import signal
import time

import prewarmed
import pytest
from test_cache import BIGGER
from test_cli import file_run_args, harmsweep, pair_files  # noqa: F401  (fixture)


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_run_says_where_it_stopped_and_resumes(tmp_path, pair_files, signum, status):  # noqa: F811
    run_dir = tmp_path / "run"
    args = [*file_run_args(run_dir, *pair_files), *BIGGER, "paths.artifacts=null"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HARMSWEEP_CACHE": str(tmp_path / "cache")}
    err = tmp_path / "stderr"
    proc = prewarmed.start("harmsweep.cli", args, cwd=tmp_path, env=env, stderr=str(err))
    deadline = time.time() + 120
    while not list(run_dir.glob("artifacts/calibration/*/calibration.safetensors")) and time.time() < deadline:
        assert proc.poll() is None, err.read_text()
        time.sleep(0.01)
    proc.send_signal(signum)
    assert proc.wait(60) == status
    lines = err.read_text().strip().splitlines()
    name = signal.Signals(signum).name
    assert lines[-1].startswith(f"harmsweep: interrupted by {name} during ") and str(run_dir) in lines[-1]
    assert "Traceback" not in err.read_text()
    mark = json.loads((run_dir / "INTERRUPTED").read_text())
    assert mark["signal"] == name and mark["stage"] and mark["time"]
    assert mark["stage"] in lines[-1] and not (run_dir / "result.json").exists()

    rerun = harmsweep(*args, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    result = json.loads((run_dir / "result.json").read_text())
    assert result["computed"]["calibration"] is False  # resumed: the finished stage was kept
    assert not (run_dir / "INTERRUPTED").exists() and not (run_dir / "FAILED").exists()
