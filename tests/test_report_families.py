"""A report never pools unlike runs: runs that differ in a selection option (scores, unit, N:M, sequential, ...) are
separate families, each its own curve and compression row, labelled by what differs; runs.csv says which is which."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import write_pairs
from test_cli import file_run_args, harmsweep
from test_report import report_cli

from harmsweep.report.families import family_rows, selection


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


def _config(sparsity: float, seed: int, **eval_block: object) -> dict:
    return {
        "seed": seed, "experiment": None, "model": {"name": "m", "logits_chunk": 64}, "alignment": {"name": "aligned"},
        "pruning": {"rule": "signed_snip", "sparsity": sparsity, "protect": 0.01, "granularity": "global"},
        "calibration": {"n": 32}, "eval": {"n": 32, "max_new_tokens": 64, **eval_block}, "paths": {"artifacts": "/x"},
    }  # fmt: skip


def test_runs_evaluated_differently_are_families_named_by_what_differs():
    """Beyond the selection options: any other part of the run identity (here the evaluation) splits a family; the
    axes (sparsity, seed), the grouping columns and where things are stored do not."""
    from harmsweep.report.families import setting_of, with_settings

    configs = {"a": _config(1e-4, 0), "b": _config(1e-3, 1) | {"paths": {"artifacts": "/elsewhere"}},
               "c": _config(1e-4, 0, n=16), "d": _config(1e-4, 0, n=16, max_new_tokens=8, attack="prefill")}  # fmt: skip
    rows = [{"run_id": k, "method": "prune", "family": "scores=wanda" if k == "d" else ""} for k in configs]
    out = {r["run_id"]: r for r in with_settings(rows, {k: setting_of(c) for k, c in configs.items()})}
    assert out["a"]["setting"] == out["b"]["setting"] != out["c"]["setting"]
    assert (
        out["a"]["family"]
        == out["b"]["family"]
        == "eval.attack=unset, eval.max_new_tokens=64, +1 more #" + (out["a"]["family"].rsplit("#", 1)[1])
    )
    assert out["c"]["family"].startswith("eval.attack=unset, eval.max_new_tokens=64, +1 more #")
    assert out["c"]["family"] != out["a"]["family"]  # same first keys shown, told apart by the digest
    assert out["d"]["family"].startswith("scores=wanda, eval.attack=prefill, eval.max_new_tokens=8, +1 more #")
    two = with_settings(rows[:3], {k: setting_of(configs[k]) for k in "abc"})
    assert [r["family"] for r in two] == ["eval.n=32", "eval.n=32", "eval.n=16"]
    assert [r["family"] for r in with_settings(rows[:2], {k: setting_of(configs[k]) for k in "ab"})] == ["", ""]
    named = [{**r, "experiment": e} for r, e in zip(rows[:3], ("demo", "demo", None), strict=True)]
    assert [r["family"] for r in with_settings(named, {k: setting_of(configs[k]) for k in "abc"})] == [
        "experiment=demo", "experiment=demo", "experiment=none"
    ]  # fmt: skip  # each experiment one setting: named by the experiment
