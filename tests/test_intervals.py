"""The bootstrap behind every interval: its draws, its pairing, its figures against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from harmsweep.errors import HarmsweepError
from harmsweep.intervals import (
    BootstrapSpec,
    Resampler,
    Sample,
    harm_reduction_of,
    mean_sample,
    p_value,
    percentile_interval,
    run_intervals,
    selectivity_of,
    utility_ratio_of,
)
from harmsweep.report.uncertainty import (
    Draw,
    differences,
    selective_area,
    threshold_interval,
    threshold_reps,
    variant_uncertainty,
)


def ids(n: int, prefix: str = "advbench") -> list[str]:
    return [f"{prefix}:{i}" for i in range(n)]


def test_sample_statistics_match_direct_computation():
    s = mean_sample(ids(4), [1.0, None, 3.0, 8.0])
    assert float(s.estimate()) == 4.0 and s.n == 3  # None is unscored: left out, not read as 0
    ppl = Sample(tuple(ids(3)), (2.0, 4.0, 6.0), "exp_ratio", (1.0, 2.0, 3.0))
    assert float(ppl.estimate()) == pytest.approx(math.exp(12.0 / 6.0))
    idx = np.array([[0, 0, 0], [2, 1, 2]])
    assert ppl.estimate(idx).tolist() == pytest.approx([math.exp(2.0), math.exp(16.0 / 8.0)])
    assert Sample.from_json(ppl.to_json()) == ppl


def test_draws_depend_on_the_items_and_the_seed_only():
    a, b = Resampler(BootstrapSpec(200, 0.95, 0)), Resampler(BootstrapSpec(200, 0.95, 0))
    assert np.array_equal(a.indices(ids(10)), b.indices(ids(10)))  # another run over the same prompts: same draws
    assert not np.array_equal(a.indices(ids(10)), a.indices(ids(10, "alpaca")))  # another item set: independent
    other_seed = Resampler(BootstrapSpec(200, 0.95, 1))
    assert not np.array_equal(a.indices(ids(10)), other_seed.indices(ids(10)))
    assert a.indices(ids(10)).shape == (200, 10) and a.indices(ids(10)).max() < 10


def test_interval_of_a_mean_agrees_with_normal_theory():
    rng = np.random.default_rng(7)
    values = rng.normal(2.0, 1.0, size=400)
    spec = BootstrapSpec(4000, 0.95, 3)
    reps = Resampler(spec).replicates(mean_sample(ids(400), values.tolist()))
    lo, hi = percentile_interval(reps, spec.level)
    half = 1.959964 * values.std(ddof=1) / math.sqrt(values.size)  # independent: the textbook interval
    assert lo == pytest.approx(values.mean() - half, abs=0.15 * half)
    assert hi == pytest.approx(values.mean() + half, abs=0.15 * half)


def test_before_and_after_are_paired_over_items():
    """A pruning that shifts every item by the same amount has a delta interval of exactly that amount."""
    rng = np.random.default_rng(0)
    before = rng.normal(5.0, 2.0, size=32)
    spec = BootstrapSpec(1000, 0.95, 0)
    b, a = mean_sample(ids(32), before.tolist()), mean_sample(ids(32), (before + 0.25).tolist())
    out = run_intervals({"nll_harmful": b}, {"nll_harmful": a}, spec)
    delta = out["delta_nll_harmful"]
    assert (
        delta["value"] == pytest.approx(0.25)
        and delta["lo"] == pytest.approx(0.25)
        and delta["hi"] == pytest.approx(0.25)
    )
    assert out["nll_harmful_before"]["hi"] - out["nll_harmful_before"]["lo"] > 0.5  # the items themselves vary
    assert delta["n"] == 32 and out["nll_harmful_after"]["n"] == 32


def test_run_intervals_cover_every_derived_figure_with_its_point_value():
    spec = BootstrapSpec(500, 0.95, 0)
    harm_b, harm_a = [1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]
    before = {"asr_keyword_mean": mean_sample(ids(4), harm_b), "nll_harmful": mean_sample(ids(4), [2.0, 3.0, 2.5, 2.0]),
              "nll_benign": mean_sample(ids(4, "alpaca"), [1.0, 1.5, 1.2, 1.1]),
              "perplexity": Sample(tuple(ids(4, "alpaca")), (10.0, 12.0, 8.0, 9.0), "exp_ratio", (5.0, 6.0, 4.0, 5.0))}  # fmt: skip
    after = {"asr_keyword_mean": mean_sample(ids(4), harm_a), "nll_harmful": mean_sample(ids(4), [3.0, 3.5, 3.5, 2.6]),
             "nll_benign": mean_sample(ids(4, "alpaca"), [1.1, 1.6, 1.3, 1.1]),
             "perplexity": Sample(tuple(ids(4, "alpaca")), (11.0, 12.5, 8.5, 9.0), "exp_ratio", (5.0, 6.0, 4.0, 5.0))}  # fmt: skip
    out = run_intervals(before, after, spec)
    assert out["harm_reduction/asr_keyword"]["value"] == pytest.approx(1 - 0.25 / 0.75)
    assert out["harm_reduction/likelihood"]["value"] == pytest.approx(1 - math.exp(-(3.15 - 2.375)))
    assert out["utility_ratio/perplexity"]["value"] == pytest.approx(math.exp(39 / 20) / math.exp(41 / 20))
    assert out["utility_ratio/likelihood"]["value"] == pytest.approx(math.exp(-0.075))
    assert out["selectivity"]["value"] == pytest.approx(0.775 / 0.075)
    assert out["selectivity"]["n"] == 4 and out["selectivity"]["n_benign"] == 4
    for figure in out.values():
        assert figure["lo"] <= figure["value"] <= figure["hi"]


def test_undefined_figures_have_no_interval():
    spec = BootstrapSpec(200, 0.95, 0)
    zero = mean_sample(ids(4), [0.0] * 4)
    out = run_intervals({"asr_keyword_mean": zero}, {"asr_keyword_mean": zero}, spec)
    assert out["harm_reduction/asr_keyword"] == {"value": None, "lo": None, "hi": None, "n": 4}  # 1 - 0/0
    assert np.isnan(selectivity_of(0.3, 0.0)) and selectivity_of(0.3, 0.1) == pytest.approx(3.0)
    assert percentile_interval(np.array([np.nan] * 10 + [1.0] * 90), 0.95) == (None, None)  # too many undefined


def test_derived_formulas_on_scalars_and_arrays_agree():
    b, a = np.array([0.5, 0.8]), np.array([0.25, 0.8])
    assert harm_reduction_of("asr_keyword", b, a).tolist() == [0.5, 0.0]
    assert float(harm_reduction_of("likelihood", 1.0, 1.5)) == pytest.approx(1 - math.exp(-0.5))
    assert float(utility_ratio_of("perplexity", 10.0, 12.5)) == pytest.approx(0.8)


def test_percentiles_keep_infinite_bounds_and_p_values_count_tails():
    reps = np.array([1.0] * 50 + [math.inf] * 50)
    assert percentile_interval(reps, 0.95) == (1.0, math.inf)
    assert p_value(np.linspace(-1, 1, 1001)) == pytest.approx(1.0)
    assert p_value(np.full(999, 0.5)) == pytest.approx(2 / 1000)


@pytest.mark.parametrize("cfg", [{"samples": 10}, {"level": 1.5}])
def test_bad_bootstrap_settings_fail_in_one_line(cfg):
    with pytest.raises(HarmsweepError, match=r"bootstrap needs samples >= 100"):
        BootstrapSpec(**cfg).validate()


# ---------------------------------------------------------------- whole curves (the report)


def draw(x: float, harm: list[float], util: float = 1.0, seed: int = 0) -> Draw:
    h = np.array(harm)
    return Draw(x, float(h[0]), util, h, np.full(h.size, util), f"r{x}-{seed}", seed)


def test_thresholds_are_read_off_each_replicate_curve():
    # replicate 0: 0.5 reached at 1e-5 exactly; 1: between 1e-6 (0.25) and 1e-5 (0.75) -> 10**-5.5; 2: never
    draws = [draw(1e-6, [0.1, 0.25, 0.0]), draw(1e-5, [0.5, 0.75, 0.1])]
    reps = threshold_reps(draws, 0.5, 0.95)
    assert reps[0] == pytest.approx(-5.0) and reps[1] == pytest.approx(-5.5) and reps[2] == math.inf
    label = threshold_interval(np.array([-5.5] * 40 + [math.inf] * 60), 0.95, 1e-5)
    assert label == {"lo": pytest.approx(10**-5.5), "hi": None, "label": "[3.2e-06, >1e-05]"}


def test_selective_area_is_the_mean_gap_over_log_sparsity():
    xs = np.array([1e-6, 1e-5, 1e-4])
    harm, util = np.array([0.0, 0.5, 1.0]), np.array([1.0, 1.0, 0.5])
    # gap = harm + util - 1 = 0, 0.5, 0.5: trapezoid over two decades = (0.25 + 0.5) / 2
    assert selective_area(xs, harm, util, 1e-6, 1e-4) == pytest.approx(0.375)
    assert selective_area(xs, harm, util, 1e-5, 1e-4) == pytest.approx(0.5)
    assert selective_area(xs, harm, util, 1e-5, 1e-5) == pytest.approx(0.5)


def test_variant_differences_say_when_they_cannot_be_told_apart():
    rng = np.random.default_rng(1)
    clear_a = [draw(1e-6, list(rng.normal(0.6, 0.01, 500))), draw(1e-5, list(rng.normal(0.9, 0.01, 500)))]
    clear_b = [draw(1e-6, list(rng.normal(0.1, 0.01, 500))), draw(1e-5, list(rng.normal(0.2, 0.01, 500)))]
    noisy = [draw(1e-6, list(rng.normal(0.55, 0.3, 500))), draw(1e-5, list(rng.normal(0.9, 0.3, 500)))]
    targets = {"A50": 0.5}
    variants = {
        name: (variant_uncertainty(d, targets, 0.95, 0.95), {"A50": label, "A50_sparsity": sparsity})
        for name, d, label, sparsity in (("a", clear_a, "1.0e-06", 1e-6), ("b", clear_b, ">1e-05", None),
                                         ("c", noisy, "1.0e-06", 1e-6))
    }  # fmt: skip
    found = {
        (d.first, d.second, d.figure.split()[0] + " " + d.figure.split()[1]): d
        for d in differences(variants, ["A50"], 0.95)
    }
    assert found["a", "b", "log10 A50"].verdict == "a more compressed"
    assert (
        found["a", "b", "selective area"].verdict == "a more selective" and found["a", "b", "selective area"].p < 0.01
    )
    assert found["a", "c", "selective area"].verdict == "not distinguishable"
    assert found["a", "c", "selective area"].lo < 0 < found["a", "c", "selective area"].hi
