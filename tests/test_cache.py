"""The shared artifact cache: computed once under concurrency, crash-safe, reused across a sweep."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import prewarmed
import pytest
from test_cli import file_run_args, harmsweep, pair_files  # noqa: F401  (fixture)

from harmsweep.artifacts import atomic_path
from harmsweep.cache import cached, content_key


def _slow_compute(entry: Path, log: Path, value: str) -> str:
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(0.5)
    with atomic_path(entry / "value.txt") as tmp:
        tmp.write_text(value)
    return value


def _worker(entry: str, log: str, value: str, out: mp.Queue) -> None:
    result, computed = cached(
        Path(entry), lambda e: _slow_compute(e, Path(log), value), lambda e: (e / "value.txt").read_text(), "value.txt"
    )
    out.put((result, computed))


def test_four_concurrent_processes_compute_one_key_once(tmp_path):
    ctx = mp.get_context("fork")  # processes of their own, without importing torch anew
    queue = ctx.Queue()
    log = tmp_path / "computations.log"
    procs = [ctx.Process(target=_worker, args=(str(tmp_path / "k"), str(log), f"v{i}", queue)) for i in range(4)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert len(log.read_text().splitlines()) == 1  # exactly one computed
    assert sum(computed for _, computed in results) == 1
    assert len({value for value, _ in results}) == 1  # everyone got the same artifact


def _crashing_writer(entry: str) -> None:
    path = Path(entry) / "value.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text("half")
        os.kill(os.getpid(), signal.SIGKILL)  # dies mid-write, holding the lock


def test_a_killed_writer_leaves_nothing_taken_as_valid(tmp_path):
    ctx = mp.get_context("fork")  # processes of their own, without importing torch anew
    entry = tmp_path / "k"

    p = ctx.Process(target=_crash_in_cached, args=(str(entry),))
    p.start()
    p.join(timeout=60)
    assert p.exitcode == -signal.SIGKILL
    assert not (entry / "value.txt").exists() and list(entry.glob(".value.txt.tmp-*"))  # only a temp file is left
    value, computed = cached(
        entry, lambda e: _slow_compute(e, tmp_path / "log", "fresh"), lambda e: "stale", "value.txt"
    )
    assert (value, computed) == ("fresh", True)  # the lock died with the writer; the next caller recomputes


def _crash_in_cached(entry: str) -> None:
    cached(Path(entry), lambda e: _crashing_writer(str(e)), lambda e: "loaded", "value.txt")


def test_content_key_ignores_dict_order():
    assert content_key({"a": 1, "b": [1, 2]}) == content_key({"b": [1, 2], "a": 1})
    assert content_key({"a": 1}) != content_key({"a": 2})


def test_a_sparsity_sweep_scores_once(tmp_path, pair_files):  # noqa: F811
    harmful, benign = pair_files
    args = [
        a for a in file_run_args(tmp_path / "x", harmful, benign) if not a.startswith(("hydra.run", "pruning.sparsity"))
    ]
    proc = harmsweep(
        "-m",
        *args,
        "eval=likelihood",
        "pruning.sparsity=0.001,0.01,0.05",
        f"hydra.sweep.dir={tmp_path}/sweep",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/result.json"))]
    assert len(results) == 3
    assert sorted(r["scoring_passes"] for r in results) == [0, 0, 2]  # 2 batches (harmful, benign) scored once
    assert len({r["artifacts"]["scores_harm"] for r in results}) == 1
    assert sum(r["computed"]["eval_before"] for r in results) == 1  # the unpruned model is evaluated once
    assert len({json.dumps(r["metrics"]["nll_harmful_before"]) for r in results}) == 1
    assert sorted(r["n_pruned"] for r in results) == sorted(
        round(s * results[0]["n_scored"]) for s in (0.001, 0.01, 0.05)
    )


BIGGER = [  # a tiny model big enough that scoring and evaluation take a moment
    "model.variants.aligned.tiny.hidden_size=256", "model.variants.aligned.tiny.intermediate_size=1024",
    "model.variants.aligned.tiny.num_hidden_layers=4", "calibration.n=6", "pruning.benign_importance=unsigned",
]  # fmt: skip


@pytest.mark.parametrize("kill_after", ["calibration", "eval_before"])
def test_kill_9_then_rerun_gives_the_same_result_without_recomputing(tmp_path, pair_files, kill_after):  # noqa: F811
    harmful, benign = pair_files
    reference_dir, crash_dir = tmp_path / "reference", tmp_path / "crash"
    ref = harmsweep(*file_run_args(reference_dir, harmful, benign), *BIGGER, "paths.artifacts=null", cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr
    reference = json.loads((reference_dir / "result.json").read_text())

    args = [*file_run_args(crash_dir, harmful, benign), *BIGGER, "paths.artifacts=null"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HARMSWEEP_CACHE": str(tmp_path / "cache")}
    proc = prewarmed.start("harmsweep.cli", args, cwd=tmp_path, env=env)
    marker = {
        "calibration": "artifacts/calibration/*/calibration.safetensors",
        "eval_before": "artifacts/eval_before/*/eval_before.json",
    }[kill_after]
    deadline = time.time() + 120
    while not list(crash_dir.glob(marker)) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (crash_dir / "result.json").exists()  # killed mid-run
    done_before = {p.relative_to(crash_dir): p.stat().st_mtime_ns for p in crash_dir.rglob("*.safetensors")}

    rerun = harmsweep(*args, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    result = json.loads((crash_dir / "result.json").read_text())
    assert result["metrics"] == reference["metrics"] and result["n_pruned"] == reference["n_pruned"]
    for path, stamp in done_before.items():  # finished artifacts were reused, not recomputed
        assert (crash_dir / path).stat().st_mtime_ns == stamp, path
    assert result["computed"]["calibration"] is False
