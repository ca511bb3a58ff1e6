"""Compression metrics (A)(B)(C) on hand-built curves and score sets with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from harmsweep.report.compression import Crossing, CurvePoint, concentration, gini, separation, threshold_sparsity
from harmsweep.scoring import summary

EXACT = 1e-12


def pt(sparsity: float, harm: float | None, run: str, utility: float | None = 1.0) -> CurvePoint:
    return CurvePoint(sparsity=sparsity, harm_reduction=harm, utility_ratio=utility, run_id=run)


# ---------------------------------------------------------------- (A) threshold_sparsity

MONOTONE = [pt(1e-4, 0.9, "c"), pt(1e-6, 0.2, "a"), pt(1e-5, 0.6, "b")]  # unsorted on purpose


def test_log_interpolation_between_neighbours():
    crossing = threshold_sparsity(MONOTONE, target=0.4)
    assert crossing.sparsity == pytest.approx(10**-5.5, rel=EXACT)
    assert crossing.label == "3.2e-06"
    assert crossing.run_ids == ("a", "b")


def test_exact_hit_and_first_point():
    assert threshold_sparsity(MONOTONE, target=0.6) == Crossing(1e-5, "1.0e-05", ("b",))
    assert threshold_sparsity(MONOTONE, target=0.1) == Crossing(1e-6, "1.0e-06", ("a",))  # no extrapolation below


def test_never_reached_and_empty():
    assert threshold_sparsity(MONOTONE, target=0.95) == Crossing(None, ">1e-04", ())
    assert threshold_sparsity([pt(2.5e-5, 0.1, "a")], target=0.5).label == ">2.5e-05"
    assert threshold_sparsity([], target=0.5) == Crossing(None, "n/a", ())
    assert threshold_sparsity([pt(1e-5, None, "a"), pt(1e-4, 0.9, "b", None)], target=0.5).label == "n/a"


def test_non_monotone_curve_gives_first_crossing():
    points = [pt(1e-6, 0.1, "a"), pt(1e-5, 0.6, "b"), pt(1e-4, 0.3, "c"), pt(1e-3, 0.7, "d")]
    crossing = threshold_sparsity(points, target=0.5)
    assert crossing.sparsity == pytest.approx(10**-5.2, rel=EXACT)
    assert crossing.run_ids == ("a", "b")


def test_point_breaking_utility_does_not_count():
    # reaches at 1e-5 with utility 0.9; drops below target at 1e-4; valid at 1e-3: interpolate 1e-4 -> 1e-3
    points = [pt(1e-6, 0.2, "a"), pt(1e-5, 0.6, "b", 0.9), pt(1e-4, 0.3, "c"), pt(1e-3, 0.6, "d", 0.97)]
    crossing = threshold_sparsity(points, target=0.4)
    assert crossing.sparsity == pytest.approx(10 ** (-4 + 1 / 3), rel=EXACT)
    assert crossing.run_ids == ("c", "d")
    # the previous point already reached the target (and broke utility): the valid point itself, no interpolation
    points = [pt(1e-6, 0.2, "a"), pt(1e-5, 0.6, "b", 0.9), pt(1e-4, 0.7, "c", 0.96)]
    assert threshold_sparsity(points, target=0.4) == Crossing(1e-4, "1.0e-04", ("c",))
    # utility exactly at the floor counts; a stricter floor pushes the answer to "never"
    assert threshold_sparsity([pt(1e-5, 0.5, "a", 0.5)], target=0.5, utility_floor=0.5).sparsity == 1e-5
    assert threshold_sparsity(points, target=0.4, utility_floor=0.99).sparsity is None


def test_repeats_are_averaged():
    # alone, b2 (0.75) would reach 0.6 at 1e-5; the average 0.5 does not, so the crossing lies in (1e-5, 1e-4)
    points = [pt(1e-6, 0.1, "a"), pt(1e-5, 0.25, "b1"), pt(1e-5, 0.75, "b2"), pt(1e-4, 0.9, "c")]
    crossing = threshold_sparsity(points, target=0.6)
    assert crossing.sparsity == pytest.approx(10**-4.75, rel=EXACT)
    assert crossing.run_ids == ("b1", "b2", "c")
    # utility is averaged too: 1.0 and 0.9 -> 0.95 is fine at floor 0.94, 0.9 alone would not be
    points = [pt(1e-5, 0.25, "b1"), pt(1e-5, 0.75, "b2", 0.9)]
    assert threshold_sparsity(points, target=0.5, utility_floor=0.94) == Crossing(1e-5, "1.0e-05", ("b1", "b2"))


def test_missing_values_are_ignored():
    points = [
        pt(1e-6, 0.2, "a"),
        pt(3e-6, None, "x"),
        pt(5e-6, 0.9, "y", None),
        pt(1e-5, 0.6, "b"),
        pt(2e-6, math.nan, "z"),
    ]
    crossing = threshold_sparsity(points, target=0.4)
    assert crossing.sparsity == pytest.approx(10**-5.5, rel=EXACT)
    assert crossing.run_ids == ("a", "b")


def test_sparsity_must_be_positive():
    with pytest.raises(ValueError, match="sparsity"):
        pt(0.0, 0.0, "unpruned")


# ---------------------------------------------------------------- (B) concentration and gini


def harm_set(*h_rows: list[float]) -> dict[str, torch.Tensor]:
    """Raw signed SNIP S for the given harm scores H = -S, one matrix per row."""
    return {f"m{i}": -torch.tensor(row, dtype=torch.float32) for i, row in enumerate(h_rows)}


def test_concentration_known_answer():
    scores = harm_set([5, 3, -1, 0], [2, 0, 0, -4])  # positive total 10
    assert concentration(scores, 1) == pytest.approx(0.5, rel=EXACT)
    assert concentration(scores, 2) == pytest.approx(0.8, rel=EXACT)
    assert concentration(scores, 3) == pytest.approx(1.0, rel=EXACT)
    assert concentration(scores, 100) == pytest.approx(1.0, rel=EXACT)
    assert concentration(scores, 0) == 0.0


def test_concentration_counts_ties_up_to_exactly_k():
    scores = {"a": -torch.tensor([[2.0, 1.0], [2.0, 0.0]]), "b": -torch.tensor([2.0, 1.0])}  # total 8
    assert concentration(scores, 2) == pytest.approx(4 / 8, rel=EXACT)
    assert concentration(scores, 4) == pytest.approx(7 / 8, rel=EXACT)


def test_concentration_without_positive_mass_is_nan():
    assert math.isnan(concentration(harm_set([-1, -2], [0, -3]), 2))
    assert math.isnan(concentration({}, 2))


def test_gini_known_values():
    assert gini(harm_set([1.5, 1.5, 1.5], [1.5, 1.5])) == pytest.approx(0.0, abs=EXACT)
    assert gini(harm_set([0, 0, 7, 0, -2], [0, -1, 0, 0, 0])) == pytest.approx(9 / 10, rel=EXACT)
    # x = [0, 1, 2, 3] (the -5 clips to 0): sum i x = 20, G = 40 / 24 - 5 / 4 = 5 / 12
    assert gini(harm_set([1, -5], [3, 2])) == pytest.approx(5 / 12, rel=EXACT)


def test_gini_empty_or_all_zero_is_nan():
    assert math.isnan(gini({}))
    assert math.isnan(gini(harm_set([0, -1], [-3])))


def test_gini_chunks_agree_with_direct_formula(monkeypatch):
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.randn(7, 5, generator=g), "b": torch.randn(11, generator=g)}
    x = torch.cat([(-s).clamp(min=0).view(-1) for s in scores.values()]).double().sort().values
    n = x.numel()
    direct = float(2 * (torch.arange(1, n + 1, dtype=torch.float64) * x).sum() / (n * x.sum()) - (n + 1) / n)
    monkeypatch.setattr(summary, "_GINI_CHUNK", 3)
    assert gini(scores) == pytest.approx(direct, rel=1e-9)


# ---------------------------------------------------------------- (C) separation


def test_separation_known_overlap():
    harm = harm_set([9, 8, 0, 0], [0, 0, 0, 7])  # TopK(H) = {m0[0], m0[1], m1[3]}
    benign = {"m0": torch.tensor([5.0, 0.1, -6.0, 0.0]), "m1": torch.tensor([-4.0, 0.2, 0.0, 0.3])}
    # TopK(U), U = |S_benign| = {m0[2], m0[0], m1[0]}: overlap {m0[0]}, union 5
    assert separation(harm, benign, 3) == pytest.approx(1 / 5, rel=EXACT)


def test_separation_identical_rankings_and_ties():
    harm = harm_set([3, 1, 2], [5, 4])
    benign = {n: -2 * s for n, s in harm.items()}  # U = |S_benign| ranks exactly like H
    assert separation(harm, benign, 2) == 1.0
    assert separation(harm, benign, 4) == 1.0
    # all tied: both take the first k in matrix order, then flat order
    ones = harm_set([1, 1], [1, 1])
    assert separation(ones, {n: s.abs() for n, s in ones.items()}, 3) == 1.0
    assert math.isnan(separation(harm, benign, 0))


def test_separation_only_positive_harm_is_eligible():
    harm = harm_set([4, -1, -2])  # one eligible harm weight
    benign = {"m0": torch.tensor([1.0, 3.0, 2.0])}  # TopK(U) at k=2 = {1, 2}
    assert separation(harm, benign, 2) == 0.0


def test_separation_rejects_mismatched_sets():
    with pytest.raises(ValueError, match="different matrices"):
        separation(harm_set([1]), {"other": torch.ones(1)}, 1)
