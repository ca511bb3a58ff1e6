"""logger.aliases=orgad2026: the W&B summary also carries the B-TAP authors' key names, read back from real
offline W&B files (`wandb leet inspect`, as tests/test_tracking.py does). Every W&B location points into tmp_path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import wandb_offline

from harmsweep.config.schema import to_config
from harmsweep.errors import HarmsweepError
from harmsweep.tracking import ORGAD2026_ALIASES, LoggerConfig, WandbTracker, alias_keys, open_tracker, summary_of

wandb = pytest.importorskip("wandb")

WANDB_CLI = Path(sys.executable).parent / "wandb"
RID = "a11a5e5f0001"
# the metrics as the suite names them (intervals.with_stage: "lm_eval/mean/acc" -> "lm_eval_after/mean/acc")
METRICS = {
    "strongreject_mean_before": 0.61, "strongreject_mean_after": 0.125, "delta_strongreject_mean": -0.485,
    "zero_fraction_after": 1.25e-5, "perplexity_before": 7.5, "perplexity_after": 7.75,
    "perplexity_attacked_after": 8.5, "lm_eval_after/mean/acc": 0.6875, "lm_eval_after/mean/acc_stderr": 0.0123,
    "lm_eval_after/boolq/acc": 0.8, "triviaqa_acc_after": 0.5625, "refusal_rate_before": 0.25,
    "refusal_rate_after": 0.5, "alpaca_judge_mean_after": 6.5, "asr_keyword_mean_after": 0.9375,
    "explanation_mean_after": 3.5, "explanation_coherence_mean_after": 0.75, "coherence_mean_after": 0.625,
    "detection_yes_rate_harmful_after": 0.875, "detection_no_rate_harmful_after": 0.125,
    "detection_yes_rate_counterfact_after": 0.25, "detection_no_rate_counterfact_after": 0.5,
}  # fmt: skip
THEIRS = {  # their key -> the value it must carry (written out, not derived from the alias table)
    "strongreject_mean_score": 0.125, "sparsity_ratio": 1.25e-5, "wikitest_ppl": 7.75,
    "wikitest_ppl_after_attack": 8.5, "mean_accuracy_zero_shot": 0.6875, "mean_accuracy_zero_shot_stderr": 0.0123,
    "triviaqa_acc": 0.5625, "refusal_rate": 0.0625, "alpaca_judge_score": 6.5,  # refusal: 1 - keyword ASR
    "mean_explanation_score": 3.5, "explanation_mean_coherency": 0.75, "safety_mean_coherency": 0.625,
    "yes_rate_harmful": 0.875, "no_rate_harmful": 0.125, "yes_rate_counterfact": 0.25, "no_rate_counterfact": 0.5,
}  # fmt: skip


def result(corpus: str | None = "wikitext", metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    out = {"run_id": RID, "model": "tiny_llama", "alignment": "aligned", "n_scored": 1000, "n_pruned": 3,
           "metrics": dict(METRICS if metrics is None else metrics)}  # fmt: skip
    return out if corpus is None else {**out, "perplexity_corpus": corpus}


def test_alias_keys_name_the_pruned_models_values() -> None:
    assert set(ORGAD2026_ALIASES) | {"refusal_rate"} == set(THEIRS)
    assert alias_keys(result(), "orgad2026") == THEIRS
    assert alias_keys(result(), "none") == {}


def test_held_out_perplexity_is_not_their_wikitext_perplexity() -> None:
    for corpus in ("heldout", None):
        keys = alias_keys(result(corpus), "orgad2026")
        assert "wikitest_ppl" not in keys and "wikitest_ppl_after_attack" not in keys
        assert keys == {k: v for k, v in THEIRS.items() if not k.startswith("wikitest_ppl")}


def test_missing_or_non_numeric_sources_give_no_alias() -> None:
    only = {"strongreject_mean_before": 0.5, "refusal_rate_after": None, "triviaqa_acc_after": "n/a"}
    assert alias_keys(result(metrics=only), "orgad2026") == {}  # a before value never stands in for after
    partial = {"strongreject_mean_after": 0.25, "lm_eval/mean/acc_after": 0.5}  # not how with_stage names it
    assert alias_keys(result(metrics=partial), "orgad2026") == {"strongreject_mean_score": 0.25}


def test_summary_keeps_our_keys_and_adds_theirs() -> None:
    plain = summary_of(result())
    with_aliases = summary_of(result(), "orgad2026")
    assert with_aliases == {**plain, **THEIRS} and not set(THEIRS) & set(plain)


def test_unknown_alias_set_fails_when_the_config_is_read() -> None:
    with pytest.raises(HarmsweepError, match=r"logger\.aliases=theirs is not one of none, orgad2026"):
        LoggerConfig(aliases="theirs")
    with pytest.raises(HarmsweepError, match=r"logger\.aliases=theirs"):
        to_config({"logger": {"name": "wandb", "aliases": "theirs"}})
    assert to_config({}).logger.aliases == "none"


@pytest.fixture
def wb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb_offline(tmp_path, monkeypatch)


def logged_summary(run_dir: Path, aliases: str) -> dict[str, Any]:
    """Log result() through a real offline W&B run and read its summary back from the run files."""
    cfg = LoggerConfig(name="wandb", project="pruning_safety", mode="offline", aliases=aliases)
    tracker = open_tracker(cfg, run_id=RID, run_dir=run_dir, config={"logger": {"aliases": aliases}})
    try:
        assert isinstance(tracker, WandbTracker)
        tracker.log_result(result(), [], None)
    finally:
        tracker.finish()
    (run,) = sorted((run_dir / "wandb").glob("offline-run-*"))
    cmd = [str(WANDB_CLI), "leet", "inspect", "--summary", "--json", str(run)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout)["summary"]


@pytest.mark.usefixtures("wb_env")
def test_offline_wandb_summary_carries_their_keys(tmp_path: Path) -> None:
    summary = logged_summary(tmp_path / "with", "orgad2026")
    assert {k: summary.get(k) for k in THEIRS} == THEIRS
    assert summary["strongreject_mean_after"] == 0.125 and summary["lm_eval_after/mean/acc"] == 0.6875  # ours stay
    plain = logged_summary(tmp_path / "without", "none")
    assert not set(THEIRS) & set(plain) and plain["strongreject_mean_after"] == 0.125
