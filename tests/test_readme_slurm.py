"""The README's SLURM lines, run as written on the local cluster (tests/test_readme.py runs the rest; a file of its
own so that pytest-xdist runs the two at once)."""

from __future__ import annotations

import csv
import subprocess
import sys
import time

import pytest
from test_readme import ROOT, of_kind, session  # noqa: F401  (session: a fixture, one scratch folder per file)
from test_slurm import slurm_cluster  # noqa: F401  (fixture)


@pytest.mark.slurm
def test_slurm_lines_run_as_written_on_the_local_cluster(session, slurm_cluster):  # noqa: F811
    """The local cluster's lines, then the W&B sweep of the SLURM section through submit_detached.sh (a gpu
    partition of fake GPUs; 1 CPU and 3 GB a job on this 2-core node), its log, and its report."""
    lines = of_kind("slurm")
    assert [line.argv[0] for line in lines] == ["launchers/submit_detached.sh", "tail", "launchers/slurm-local.sh",
                                                "harmsweep", "harmsweep-report"]  # fmt: skip
    for line in lines:
        start = time.monotonic()
        env = session.env(line)
        if line.argv[0] == "launchers/slurm-local.sh":
            proc = subprocess.run(["bash", str(ROOT / line.argv[0]), *line.argv[1:]], capture_output=True, text=True,
                                  timeout=900, cwd=session.cwd)  # fmt: skip
        elif line.argv[0] == "harmsweep":  # the default artifact cache under a $HOME of its own: the profile allows it
            home = session.cwd / "home"
            env = {**{k: v for k, v in env.items() if k != "HARMSWEEP_CACHE"}, "HOME": str(home)}
            proc = subprocess.run([sys.executable, "-m", "harmsweep.cli", *session.argv(line)], capture_output=True,
                                  text=True, timeout=900, cwd=session.cwd, env=env)  # fmt: skip
            assert list((home / ".cache" / "harmsweep" / "artifacts").iterdir()), proc.stdout
        elif line.argv[0] == "launchers/submit_detached.sh":
            args = [*session.argv(line), "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=3"]
            proc = subprocess.run(["bash", str(ROOT / line.argv[0]), *args], capture_output=True, text=True,
                                  timeout=60, cwd=session.cwd, env=env)  # fmt: skip
            rc, log = (session.cwd / "outputs" / "sweeps" / f"qwen-compression.driver.{x}" for x in ("rc", "log"))
            while not rc.exists() and time.monotonic() - start < 1500:
                time.sleep(2)
            assert rc.read_text().strip() == "0", log.read_text()[-3000:]
        elif line.argv[0] == "tail":
            proc = subprocess.run(["tail", *line.argv[2:]], capture_output=True, text=True, cwd=session.cwd)
            assert "30 runs: 30 ran, 0 were done already, 0 failed" in proc.stdout, proc.stdout
            offline = [p for p in (session.cwd / "wandb" / "wandb").glob("offline-run-*") if "-report-" not in p.name]
            assert len({p.name.rsplit("-", 1)[-1] for p in offline}) == 30, offline  # WANDB_DIR: one per run folder
        else:
            proc = session.run(line)
            report = session.cwd / line.argv[1] / "report"
            with (report / "compression.csv").open() as f:
                assert {row["alignment"] for row in csv.DictReader(f)} == {"aligned", "base"}
        print(f"[readme] {time.monotonic() - start:6.1f}s exit {proc.returncode}: {line.text}")
        assert proc.returncode == 0, f"{line.text}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
