"""The few lines a run prints: the rule in full, harm reduction and utility ratio with the sign in words."""

from __future__ import annotations

from harmsweep.pruning.spec import PruningConfig
from harmsweep.report.console import rule_text, summary


def _pruning(**changes) -> dict:
    from dataclasses import asdict

    return {**asdict(PruningConfig()), "criterion": "snip", **changes}


def _result(n_pruned: int = 106, **intervals) -> dict:
    return {
        "run_id": "abc", "model": "m", "alignment": "aligned", "pruning": _pruning(), "n_pruned": n_pruned,
        "n_scored": 1000, "actual_sparsity": n_pruned / 1000, "metrics": {},
        "intervals": {"settings": {"level": 0.95}, "metrics": intervals},
    }  # fmt: skip


def test_the_rule_is_stated_in_full():
    assert rule_text(_pruning(rule="signed_snip", protect=0.01, benign_importance="abs_signed")) == (
        "signed_snip (scores snip, minus the top 0.01 by abs_signed benign score, global)"
    )
    wanda = rule_text(_pruning(rule="signed_snip", criterion="wanda", granularity="nm", nm_n=2, nm_m=4))
    assert wanda.startswith("signed_snip (scores wanda, minus the top") and wanda.endswith(", 2:4 per row)")
    assert rule_text(_pruning(rule="random")) == "random (scores snip, global)"  # no set difference: no protect
    options = rule_text(_pruning(rule="magnitude", sequential=True, replace="base", order="bottom"))
    assert "sequential=True" in options and "replace=base" in options and "order=bottom" in options


def test_harm_reduction_and_utility_ratio_spell_out_their_sign():
    lines = summary(_result(**{
        "harm_reduction/asr_keyword": {"value": 0.47, "lo": 0.15, "hi": 0.73},
        "utility_ratio/perplexity": {"value": 0.94, "lo": 0.92, "hi": 0.96},
    })).splitlines()  # fmt: skip
    assert "  harm reduced by 0.47 95% CI [0.15, 0.73] (asr_keyword; 1 = all removed)" in lines
    assert "  utility ratio 0.94 95% CI [0.92, 0.96] (perplexity, after vs before; 1 = unchanged)" in lines
    worse = summary(_result(**{"harm_reduction/likelihood": {"value": -0.02, "lo": -0.05, "hi": 0.01}}))
    assert "  harm INCREASED by 0.02 95% CI [-0.01, 0.05] (likelihood)" in worse.splitlines()


def test_an_undefined_measure_falls_back_to_the_next_one():
    """No harmful answer before pruning: the keyword reduction is undefined (nan), the likelihood one is not."""
    text = summary(_result(**{
        "harm_reduction/asr_keyword": {"value": float("nan"), "lo": None, "hi": None},
        "harm_reduction/likelihood": {"value": 0.17, "lo": 0.16, "hi": 0.18},
    }))  # fmt: skip
    assert "harm reduced by 0.17 95% CI [0.16, 0.18] (likelihood; 1 = all removed)" in text


def test_a_run_that_pruned_nothing_says_so():
    assert "NOTHING WAS PRUNED" in summary(_result(n_pruned=0))
    assert "NOTHING WAS PRUNED" not in summary(_result(n_pruned=5))


def test_a_run_that_pruned_fewer_than_asked_says_so():
    text = summary({**_result(n_pruned=40), "n_asked": 106})
    assert "  PRUNED FEWER THAN ASKED: 40 of the 106 the sparsity asks for (no more weights were eligible)" in text
    assert "FEWER" not in summary({**_result(n_pruned=106), "n_asked": 106})
    assert "FEWER" not in summary(_result(n_pruned=40))  # nothing fixed in advance (a harm fraction, N:M, heads)


def test_the_count_a_sparsity_asks_for():
    from harmsweep.pruning.spec import PruneSpec, asked_count

    shapes = {"a": (8, 16), "b": (4, 10)}
    assert asked_count(PruneSpec(sparsity=0.1), shapes) == round(0.1 * 168)
    assert asked_count(PruneSpec(sparsity=0.1, granularity="matrix"), shapes) == round(12.8) + round(4.0)
    assert asked_count(PruneSpec(rule="orgad2026", harm_fraction=0.1, protect=0.01), shapes) is None
    assert asked_count(PruneSpec(granularity="nm", protect=0.0), shapes) is None
