"""Compression metrics of the paper's section 6: how few weights carry harmful generation.

(A) ``threshold_sparsity``: the smallest sparsity whose pruning cuts harm by a target fraction while utility stays
above a floor, read off a harm/utility-vs-sparsity curve. (B) ``concentration`` and ``gini``: how much of the positive
harm score H = -S_harm the top weights hold. (C) ``separation``: Jaccard overlap of the top-k harm weights and the
top-k benign-important weights (U = |S_benign|). Aligned models should need smaller sparsities, concentrate more and
overlap less than their base models.

Score sets are the raw signed SNIP S of ``harmsweep.scoring.store.open_scores`` (not negated), dense or compact. Top-k selections reuse the
streaming radix select of ``harmsweep.pruning`` (exact, ties broken as pruning breaks them), so (B) and (C) scale to
7e9 scores with one matrix-sized temporary at a time; only the Gini needs a sort.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from harmsweep.scoring import store, summary
from harmsweep.scoring.topk import EXCLUDED, Threshold, float_keys, top_k_threshold

# ---------------------------------------------------------------- (A) threshold sparsity


@dataclass(frozen=True)
class CurvePoint:
    """One finished run on a harm/utility-vs-sparsity curve, both measured relative to the unpruned model."""

    sparsity: float  # > 0: the x axis is logarithmic
    harm_reduction: float | None  # 1 - harm_after / harm_before
    utility_ratio: float | None  # utility_after / utility_before, higher is better
    run_id: str

    def __post_init__(self) -> None:
        if not self.sparsity > 0:  # also rejects NaN
            raise ValueError(f"run {self.run_id}: sparsity must be > 0 on a log axis, got {self.sparsity}")


@dataclass(frozen=True)
class Crossing:
    """Where a curve first reaches the target, with the runs it was read from (for traceability)."""

    sparsity: float | None  # None when never reached
    label: str  # "3.2e-05", ">1e-04" (never reached, up to the largest sparsity tried) or "n/a" (no points)
    run_ids: tuple[str, ...]  # the runs of the two points interpolated between, or of the one point hit


@dataclass(frozen=True)
class _Mean:
    sparsity: float
    harm: float
    utility: float
    run_ids: tuple[str, ...]


def _bound_label(sparsity: float) -> str:
    """One significant digit when it is exact (1e-04), two otherwise, so ">" never claims more than was tried."""
    short = f"{sparsity:.0e}"
    return short if math.isclose(float(short), sparsity, rel_tol=1e-9) else f"{sparsity:.1e}"


def _averaged(points: Sequence[CurvePoint]) -> list[_Mean]:
    """Usable points, averaged per sparsity (repeats, seeds), sorted by sparsity."""
    groups: dict[float, list[tuple[float, float, str]]] = {}
    for p in points:
        h, u = p.harm_reduction, p.utility_ratio
        if h is not None and u is not None and math.isfinite(h) and math.isfinite(u):
            groups.setdefault(float(p.sparsity), []).append((h, u, p.run_id))
    return [
        _Mean(
            sparsity,
            math.fsum(h for h, _, _ in group) / len(group),
            math.fsum(u for _, u, _ in group) / len(group),
            tuple(run for _, _, run in group),
        )
        for sparsity, group in sorted(groups.items())
    ]


def threshold_sparsity(points: Sequence[CurvePoint], target: float, utility_floor: float = 0.95) -> Crossing:
    """Metric (A): the smallest sparsity at which harm_reduction >= target while utility_ratio >= utility_floor.

    A single number per curve lets aligned and base variants be compared ("aligned needs 10x fewer weights").
    Rules:
    - points with a None (or non-finite) harm_reduction or utility_ratio are ignored; points at the same sparsity
      (repeats, seeds) are averaged first, and the average carries all their run ids;
    - walk up the sparsity axis; the answer lies at the first point P_j with harm_reduction >= target AND
      utility_ratio >= utility_floor. A point that reaches the target but breaks utility does not count: the walk
      goes on, since a later point may satisfy both (utility need not be monotone);
    - if P_j is the first point, or hits the target exactly, or the previous point P_{j-1} already reached the
      target (and so failed on utility), the answer is P_j's own sparsity, with P_j's runs;
    - otherwise P_{j-1} is below target: interpolate harm_reduction linearly in log10(sparsity) between P_{j-1} and
      P_j to where it equals the target, with the runs of both. Utility is judged at measured points only, never at
      the interpolated sparsity;
    - a non-monotone curve (reaches, drops, reaches again) gives the FIRST valid crossing;
    - never reached: Crossing(None, ">" + the largest usable sparsity, ()); no usable points: Crossing(None, "n/a", ()).
    """
    curve = _averaged(points)
    if not curve:
        return Crossing(None, "n/a", ())
    for j, point in enumerate(curve):
        if point.harm < target or point.utility < utility_floor:
            continue
        prev = curve[j - 1] if j else None
        if prev is None or prev.harm >= target or point.harm == target:
            return Crossing(point.sparsity, f"{point.sparsity:.1e}", point.run_ids)
        t = (target - prev.harm) / (point.harm - prev.harm)
        lo, hi = math.log10(prev.sparsity), math.log10(point.sparsity)
        sparsity = 10 ** (lo + t * (hi - lo))
        return Crossing(sparsity, f"{sparsity:.1e}", prev.run_ids + point.run_ids)
    return Crossing(None, ">" + _bound_label(curve[-1].sparsity), ())


# ---------------------------------------------------------------- (B) concentration

Scores = Mapping[str, torch.Tensor] | store.TailScores


def _harm(scores: Scores, name: str) -> torch.Tensor:
    """H = -S of one matrix (-inf where a compact set stores nothing, or S is NaN)."""
    return store.ranked(scores, name, "neg")


def _harm_keys(h: torch.Tensor) -> torch.Tensor:
    """Radix keys of H, EXCLUDED where H is not positive: only H > 0 is eligible, as in pruning."""
    return float_keys(h).masked_fill_(~(h > 0), EXCLUDED)


def _top(scores: Scores, keys_of: Callable[[str], torch.Tensor], k: int, what: str) -> Threshold:
    """Exact top-k of a ranking over a score set; a compact set whose tail is too short says so."""
    if isinstance(scores, store.TailScores):
        scores.require_unit("global")  # tails kept per matrix or row cannot give a top-k over all weights
    threshold = top_k_threshold(list(scores), keys_of, k)
    if store.short(scores, "*", threshold.available, k):
        raise ValueError(str(scores.too_short(what, k, "*")))
    return threshold


def _positive_sum(scores: Scores) -> float:
    stats = store.stats_of(scores)
    if stats is not None and stats.harm_positive_sum is not None:
        return stats.harm_positive_sum
    return sum(float(_harm(scores, n).clamp_(min=0).sum(dtype=torch.float64)) for n in scores)


def concentration(scores: Scores, k: int) -> float:
    """Metric (B): share of the total positive harm score sum(max(H, 0)) held by the k largest values of H = -S.

    Near 1 at small k means a few weights carry the harm. Exact: the k-th largest H is found by the streaming radix
    select (ties at the threshold taken up to exactly k, in pruning's order); the sums are float64, the total read
    from the set's summaries when it has them (a compact set stores only the top). Fewer than k positive values:
    every positive one is counted (share 1). NaN when there is no positive mass.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    threshold = _top(scores, lambda n: _harm_keys(_harm(scores, n)), k, "metric B")
    top = 0.0
    for name in scores:
        h = _harm(scores, name)
        top += float(h[threshold.mask(name, _harm_keys(h))].sum(dtype=torch.float64))
    total = _positive_sum(scores)
    return top / total if total > 0 else math.nan


def gini(scores: Scores, budget: int | None = None) -> float:
    """Gini coefficient of max(H, 0), H = -S, over all scored weights: 0 = spread evenly, -> 1 = held by few.

    A threshold-free companion to ``concentration``; read from the set's summaries when present (a compact set
    was summarised while the full set was in memory). Exact: G = 2 * sum_i i * x_(i) / (n * sum x) - (n + 1) / n,
    computed exactly from a dense set otherwise (harmsweep.scoring.summary.gini).
    """
    stats = store.stats_of(scores)
    if stats is not None and stats.gini is not None:
        return stats.gini
    if isinstance(scores, store.TailScores):
        raise ValueError(f"{scores.path} has no Gini summary, and its stored tail cannot give one")
    return summary.gini(scores, budget)


# ---------------------------------------------------------------- (C) separation


def separation(harm_scores: Scores, benign_scores: Scores, k: int) -> float:
    """Metric (C): Jaccard overlap of TopK(H) and TopK(U) at equal k, H = -S_harm, U = |S_benign|.

    Lower = the harm weights are more distinct from the weights benign behaviour needs, so the set difference
    costs less utility. Both sets are exact top-k selections made as pruning makes them (only H > 0 eligible for
    the harm set, ties broken by matrix order then flat index, matrix order from ``harm_scores``); the
    intersection is counted per matrix, never materialised. NaN when both sets are empty.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    names = list(harm_scores)
    if set(names) != set(benign_scores):
        raise ValueError(
            f"harm and benign score sets cover different matrices: {sorted(set(names) ^ set(benign_scores))}"
        )
    for name in names:
        if _shape(harm_scores, name) != _shape(benign_scores, name):
            raise ValueError(
                f"{name}: harm {tuple(_shape(harm_scores, name))} vs benign {tuple(_shape(benign_scores, name))}"
            )

    def harm_keys(name: str) -> torch.Tensor:
        return _harm_keys(_harm(harm_scores, name))

    def benign_keys(name: str) -> torch.Tensor:
        u = store.ranked(benign_scores, name, "abs")
        return float_keys(u).masked_fill_(u == float("-inf"), EXCLUDED)

    top_h = _top(harm_scores, harm_keys, k, "metric C (harm side)")
    top_u = _top(benign_scores, benign_keys, k, "metric C (benign side)")
    size_h = size_u = both = 0
    for name in names:
        in_h = top_h.mask(name, harm_keys(name))
        in_u = top_u.mask(name, benign_keys(name))
        size_h += int(in_h.sum())
        size_u += int(in_u.sum())
        both += int((in_h & in_u).sum())
    union = size_h + size_u - both
    return both / union if union else math.nan


def _shape(scores: Scores, name: str) -> torch.Size:
    return scores.shapes[name] if isinstance(scores, store.TailScores) else scores[name].shape
