"""The predecessor's methods as runs of the harmsweep command on a tiny model: result.json says what happened."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_pairs
from safetensors.torch import load_file
from test_cli import file_run_args, harmsweep

from harmsweep.report.build import build_report
from harmsweep.scoring.store import open_scores


@pytest.fixture
def pair_files(tmp_path: Path) -> tuple[Path, Path]:
    return write_pairs(tmp_path, 12)


def run(tmp_path: Path, files, name: str, *extra: str) -> dict:
    run_dir = tmp_path / name
    proc = harmsweep(*file_run_args(run_dir, *files, *extra), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((run_dir / "result.json").read_text())


def test_wanda_scores_feed_the_papers_rule(tmp_path, pair_files):
    result = run(tmp_path, pair_files, "wanda", "scoring=wanda")
    assert result["n_pruned"] == round(0.02 * result["n_scored"])
    assert result["pruning"]["criterion"] == "wanda"
    assert set(k for k in result["artifacts"] if k.startswith("scores_")) == {
        "scores_harm_wanda",
        "scores_benign_wanda",
    }
    assert open_scores(result["artifacts"]["scores_harm_wanda"]).order == "pos"
    assert result["scoring_passes"] == 2  # one forward per batch of 8, per set


def test_sequential_prunes_per_matrix_with_l_partial_passes(tmp_path, pair_files):
    result = run(tmp_path, pair_files, "seq", "pruning.sequential=true", "pruning.granularity=matrix",
                 "pruning=no_set_difference")  # fmt: skip
    mask = load_file(result["artifacts"]["mask"])
    assert result["n_pruned"] == sum(round(0.02 * t) for t in _sizes(tmp_path / "seq"))
    assert sum(t.numel() for t in mask.values()) == result["n_pruned"]
    assert result["scoring_passes"] == 2 * 1  # 2 layers x 1 batch of 6 harmful samples
    assert not any(k.startswith("scores_") for k in result["artifacts"])  # scores lived in memory


def _sizes(run_dir: Path) -> list[int]:
    cfg = json.loads((run_dir / "result.json").read_text())
    d, i = 64, 128  # conf/model/tiny_llama.yaml: hidden 64, intermediate 128, 4 heads of 16, 2 kv heads
    per_layer = [d * d, d * 32, d * 32, d * d, i * d, i * d, d * i]
    assert cfg["n_scored"] == 2 * sum(per_layer)
    return per_layer * 2


def test_replace_base_sets_pruned_weights_to_the_base_variants_values(tmp_path, pair_files):
    result = run(tmp_path, pair_files, "base", "pruning.replace=base")
    assert result["n_pruned"] == round(0.02 * result["n_scored"])
    assert result["metrics"]["zero_fraction_after"] == result["zero_fraction_before"]  # nothing zeroed
    assert result["actual_sparsity"] == result["n_pruned"] / result["n_scored"]  # every entry took another value
    assert result["metrics"]["nll_harmful_after"] != result["metrics"]["nll_harmful_before"]


def test_lowrank_evaluates_like_a_pruning_run_and_reaches_the_report(tmp_path, pair_files):
    results = [run(tmp_path, pair_files, f"lr{r}", "method=lowrank", f"lowrank.rank_harmful={r}",
                   "lowrank.rank_utility=1") for r in (2, 8)]  # fmt: skip
    for result, r in zip(results, (2, 8), strict=True):
        assert result["pruning"]["rule"] == "lowrank" and result["n_pruned"] == 0
        assert result["lowrank"]["spec"]["rank_harmful"] == r
        assert result["metrics"]["lowrank/rank_removed_mean"] == pytest.approx(r)
        assert 0 < result["metrics"]["lowrank/relative_norm_mean"] < 1
        assert "mask" not in result["artifacts"]
        assert result["metrics"]["nll_harmful_after"] != result["metrics"]["nll_harmful_before"]
    assert results[1]["metrics"]["lowrank/relative_norm_mean"] > results[0]["metrics"]["lowrank/relative_norm_mean"]
    report = build_report([tmp_path], tmp_path / "report")
    assert (tmp_path / "report" / "lowrank.png") in report.images
    assert "Low-rank removal" in report.html.read_text()


def test_wei2024_preset_runs_with_floor_counts(tmp_path, pair_files):
    result = run(tmp_path, pair_files, "wei", "pruning=wei2024", "pruning.harm_fraction=0.05", "pruning.protect=0.01",
                 "scores.keep=0.2", "scores.keep_benign=0.2")  # fmt: skip
    mask = load_file(result["artifacts"]["mask"])
    for size, (name, idx) in zip(_sizes(tmp_path / "wei"), sorted(mask.items(), key=lambda kv: _order(kv[0])),
                                 strict=True):  # fmt: skip
        assert idx.numel() <= int(0.05 * size), name


def _order(name: str) -> tuple[int, int]:
    kinds = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    parts = name.split(".")
    return int(parts[2]), kinds.index(parts[4])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (["pruning.order=bottom"], "reads every score"),
        (["pruning.granularity=head"], "reads every score"),
        (["pruning.replace=base", "alignment=base"], "would change nothing"),
        (["method=lowrank", "lowrank.rank_harmful=-1"], "rank"),
        (["method=sideways"], "method=sideways"),
        (["pruning.sequential=true"], "per matrix"),
    ],
)
def test_bad_method_settings_fail_in_one_line(tmp_path, pair_files, override, expected):
    run_dir = tmp_path / "bad"
    proc = harmsweep(*file_run_args(run_dir, *pair_files, *override), cwd=tmp_path)
    assert proc.returncode == 2 and expected in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (run_dir / "result.json").exists()
