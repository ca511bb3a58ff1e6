"""A finished sweep's manifest (harmsweep/sweep/manifest.py): a relaunch answers from it, and only when nothing changed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import write_pairs
from test_cli import harmsweep
from test_startup import harmsweep as harmsweep_fresh
from test_startup import summary_lines

from harmsweep.config.compose import sweep_dir
from harmsweep.config.schema import register
from harmsweep.sweep import manifest


def sweep_args(folder: Path, sparsities: str = "0.01,0.02") -> list[str]:
    harmful, benign = write_pairs(folder, 12)
    return [
        "-m", "model=tiny_llama", "calibration=file", f"calibration.harmful.file={harmful}",
        f"calibration.benign.file={benign}", "calibration.n=6", "eval.n=4", "eval.benign_references=dataset",
        "scores.keep=0.2", "data.root=null", f"pruning.sparsity={sparsities}", "pruning.rule=signed_snip,random",
        f"hydra.sweep.dir={folder / 'sweep'}",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], str]:
    """A 4-run local sweep, run to the end: its folder, its arguments and what it printed."""
    folder = tmp_path_factory.mktemp("manifest")
    args = sweep_args(folder)
    proc = harmsweep(*args, cwd=folder)
    assert proc.returncode == 0, proc.stderr
    return folder, args, proc.stdout


def _results(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted((folder / "sweep").glob("*/result.json"))}


def test_a_sweep_ends_with_what_ran_and_the_report_command(finished_sweep):
    folder, _, first = finished_sweep
    assert first.splitlines()[-2:] == [
        f"sweep {folder / 'sweep'}: 4 runs: 4 ran, 0 were done already, 0 failed",
        f"  compare them: harmsweep-report {folder / 'sweep'}",
    ]


def test_a_finished_sweep_writes_its_manifest(finished_sweep):
    folder, _, _ = finished_sweep
    written = list((folder / "sweep" / manifest.FOLDER).glob("finished-*.json"))
    assert len(written) == 1
    runs = json.loads(written[0].read_text())["runs"]
    assert sorted(Path(r["dir"]) for r in runs) == sorted(p.parent for p in _results(folder))
    for entry in runs:
        stored = json.loads((Path(entry["dir"]) / "run.json").read_text())["run_id"]
        assert entry["run_id"] == stored == Path(entry["dir"]).name


def test_its_relaunch_prints_every_run_without_composing_or_importing_torch(finished_sweep):
    folder, args, first = finished_sweep
    before = _results(folder)
    hydra_files = {p: p.stat().st_mtime_ns for p in (folder / "sweep").glob("*/.hydra/*")}
    proc, heavy = harmsweep_fresh(*args, cwd=folder)
    assert proc.returncode == 0, proc.stderr
    assert heavy == []
    lines = summary_lines(proc.stdout)
    assert lines[-2:] == [
        f"sweep {folder / 'sweep'}: all 4 runs are done and unchanged ({_manifest(folder).name})",
        f"  compare them: harmsweep-report {folder / 'sweep'}",
    ]
    assert sorted(lines[:-2]) == sorted(summary_lines(first)[:-2])  # each run's summary, as the first launch said
    assert _results(folder) == before
    assert {p: p.stat().st_mtime_ns for p in hydra_files} == hydra_files  # not even Hydra's job files rewritten


def _manifest(folder: Path) -> Path:
    return next((folder / "sweep" / manifest.FOLDER).glob("finished-*.json"))


def test_a_changed_or_missing_run_takes_the_usual_path(finished_sweep):
    folder, args, _ = finished_sweep
    result = next(iter(_results(folder)))
    stat = result.stat()
    os.utime(result, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # rewritten since the manifest
    proc = harmsweep(*args, cwd=folder)
    assert proc.returncode == 0 and "Launching 4 jobs locally" in proc.stdout + proc.stderr
    assert "runs are done and unchanged" not in proc.stdout
    assert f"sweep {folder / 'sweep'}: 4 runs: 0 ran, 4 were done already, 0 failed" in proc.stdout
    proc = harmsweep(*args, cwd=folder)  # that launch wrote the manifest anew
    assert proc.returncode == 0 and "all 4 runs are done and unchanged" in proc.stdout


def test_the_key_covers_overrides_config_files_code_and_the_environment_the_configs_read(tmp_path):
    conf = tmp_path / "conf"
    (conf / "paths").mkdir(parents=True)
    (conf / "config.yaml").write_text("root: ${oc.env:HARMSWEEP_DATA,null}\n")
    (conf / "paths" / "a.yaml").write_text("x: 1\n")
    base = manifest.key(["a=1"], conf, {"HARMSWEEP_DATA": "/d"})
    assert manifest.key(["a=1"], conf, {"HARMSWEEP_DATA": "/d", "OTHER": "1"}) == base  # not read by the configs
    assert manifest.key(["a=1"], conf, {"HARMSWEEP_DATA": "/e"}) != base
    assert manifest.key(["a=2"], conf, {"HARMSWEEP_DATA": "/d"}) != base
    assert manifest.key(["a=1", "b=2"], conf, {"HARMSWEEP_DATA": "/d"}) != base
    (conf / "paths" / "a.yaml").write_text("x: 2\n")
    assert manifest.key(["a=1"], conf, {"HARMSWEEP_DATA": "/d"}) != base


def test_a_sweep_named_by_the_clock_has_no_fixed_folder():
    register()  # the schema, as main() registers it first
    assert sweep_dir(["model=tiny_llama"]) is None  # outputs/sweeps/${now:...}: every launch is a new sweep
    assert sweep_dir(["model=tiny_llama", "hydra.sweep.dir=/x/y", "pruning.sparsity=0.1,0.2"]) == Path("/x/y")
    assert sweep_dir(["experiment=demo"]) == Path("outputs/demo")
    assert sweep_dir(["model=no_such_model", "hydra.sweep.dir=/x/y"]) is None  # the usual path says what is wrong


def test_a_single_run_never_writes_into_a_sweeps_folder(finished_sweep):
    folder, args, _ = finished_sweep
    sweep = folder / "sweep"
    single = [a for a in args if a != "-m" and not a.startswith(("hydra.sweep", "pruning.sparsity", "pruning.rule"))]
    before = sorted(p.relative_to(sweep) for p in sweep.rglob("*"))
    proc = harmsweep(*single, f"hydra.run.dir={sweep}", cwd=folder)
    assert proc.returncode == 2 and "is a sweep's folder (multirun.yaml)" in proc.stderr
    proc = harmsweep(*single, f"hydra.run.dir={sweep / 'mine'}", cwd=folder)
    assert proc.returncode == 2 and f"lies in the sweep {sweep}, whose run folders are named by run id" in proc.stderr
    assert sorted(p.relative_to(sweep) for p in sweep.rglob("*")) == before  # nothing written into the sweep
    run = json.loads(next(iter(_results(folder))).read_text())  # one of its runs, relaunched by hand into its folder
    own = [*single, f"pruning.sparsity={run['pruning']['sparsity']}", f"pruning.rule={run['pruning']['rule']}"]
    proc = harmsweep(*own, f"hydra.run.dir={sweep / run['run_id']}", cwd=folder)
    assert proc.returncode == 0 and f"run {run['run_id']}" in proc.stdout
