"""A report never pools unlike runs: runs that differ in a selection option (scores, unit, N:M, sequential, ...) are
separate families, each its own curve and compression row, labelled by what differs; runs.csv says which is which."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import write_pairs
from test_cli import file_run_args, harmsweep
from test_report import report_cli

from harmsweep.report.collect import family_rows, selection


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A snip/wanda sweep (the issue's example): 4 runs, then its report."""
    root = tmp_path_factory.mktemp("families")
    harmful, benign = write_pairs(root, 12)
    args = [a for a in file_run_args(root / "x", harmful, benign) if not a.startswith(("hydra.run", "pruning."))]
    proc = harmsweep("-m", *args, "eval=likelihood", "scoring=snip,wanda", "pruning.sparsity=0.01,0.05",
                     f"hydra.sweep.dir={root}/sweep", cwd=root)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rule signed_snip (scores wanda" in proc.stdout  # the console names the scores too
    report = report_cli(str(root / "sweep"), cwd=root)
    assert report.returncode == 0, report.stderr[-3000:]
    return root / "sweep" / "report", report.stdout


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_snip_and_wanda_runs_are_two_families(mixed):
    out, printed = mixed
    runs = _csv(out / "runs.csv")
    assert sorted((r["scoring"], r["family"], r["alignment"]) for r in runs) == [
        ("snip", "", "aligned"), ("snip", "", "aligned"),
        ("wanda", "scores=wanda", "aligned"), ("wanda", "scores=wanda", "aligned"),
    ]  # fmt: skip
    compression = _csv(out / "compression.csv")
    assert sorted((r["alignment"], r["n_runs"]) for r in compression) == [
        ("aligned", "2"), ("aligned [scores=wanda]", "2")
    ]  # fmt: skip
    assert "tiny_llama/aligned [scores=wanda]" in printed and "4 runs" in printed
    assert "  aligned: harm reduced by " in printed and "  aligned [scores=wanda]: harm " in printed  # sign in words


def test_every_selection_option_makes_its_own_family():
    base = {"rule": "signed_snip", "criterion": "snip", "granularity": "global", "nm_n": 2, "nm_m": 4,
            "sequential": False, "replace": "zero", "order": "top", "eligible": "positive", "layers": None}  # fmt: skip
    assert selection(base, {})["family"] == ""
    cases = {
        "scores=wanda": {"criterion": "wanda"}, "granularity=matrix": {"granularity": "matrix"},
        "2:4": {"granularity": "nm"}, "granularity=head": {"granularity": "head"}, "sequential": {"sequential": True},
        "replace=base": {"replace": "base"}, "order=bottom": {"order": "bottom"}, "eligible=all": {"eligible": "all"},
        "layers=[1]": {"layers": [1]},
    }  # fmt: skip
    for label, change in cases.items():
        assert selection({**base, **change}, {})["family"] == label, change
    assert selection(base, {"method": "lowrank"})["family"] == ""  # low-rank runs have a section of their own
    rows = family_rows([{"alignment": "aligned", "family": ""}, {"alignment": "aligned", "family": "2:4"}])
    assert [r["alignment"] for r in rows] == ["aligned", "aligned [2:4]"]
