"""Intervals of the report's figures: each variant's whole curve resampled over its held-out prompts.

A replicate of ``harmsweep.intervals`` draws the held-out items once per item set; every run of a curve that was
evaluated on those items (all runs of one variant and seed) takes the same draw, so the replicate is a whole
curve, and A50/A80 and the selective area are read off it as off the measured curve. Two variants evaluated on
the same prompts are compared draw by draw (paired); variants on different prompts are drawn independently.
Seeds are a sweep axis: their runs are averaged into one curve per replicate (the interval is within-run
uncertainty of that mean), and the spread of the per-seed figures is reported beside it.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from harmsweep.intervals import (
    HARM_MEASURES,
    UTILITY_MEASURES,
    Resampler,
    Sample,
    harm_reduction_of,
    p_value,
    percentile_interval,
    utility_ratio_of,
)
from harmsweep.report.compression import CurvePoint, threshold_sparsity

Stages = Mapping[str, Mapping[str, Sample]]  # "before"/"after" -> metric -> per-item values


@dataclass(frozen=True)
class Draw:
    """One run on a curve: its point values and its harm reduction / utility ratio on every replicate."""

    x: float
    harm: float
    utility: float
    harm_reps: np.ndarray
    utility_reps: np.ndarray
    run_id: str
    seed: Any


def run_draw(row: Mapping[str, Any], stages: Stages | None, x: float, resampler: Resampler) -> Draw | None:
    """The replicates of a run's harm reduction and utility ratio, in the measures its row was read with."""
    hm, um = row.get("harm_measure"), row.get("utility_measure")
    if not stages or hm not in HARM_MEASURES or um not in UTILITY_MEASURES:
        return None
    before, after = stages.get("before") or {}, stages.get("after") or {}
    h, u = HARM_MEASURES[hm], UTILITY_MEASURES[um]
    if not all(m in s for m in (h, u) for s in (before, after)):
        return None
    harm = harm_reduction_of(hm, resampler.replicates(before[h]), resampler.replicates(after[h]))
    utility = utility_ratio_of(um, resampler.replicates(before[u]), resampler.replicates(after[u]))
    point_h, point_u = row.get("harm_reduction"), row.get("utility_ratio")
    return Draw(x, _num(point_h), _num(point_u), np.asarray(harm, float), np.asarray(utility, float),
                str(row["run_id"]), row.get("seed"))  # fmt: skip


def _num(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else math.nan


def threshold_reps(draws: Sequence[Draw], target: float, floor: float) -> np.ndarray:
    """log10 of the threshold sparsity (A) on every replicate; +inf where the replicate never reaches it."""
    n = len(draws[0].harm_reps)
    out = np.empty(n)
    for b in range(n):
        points = [CurvePoint(d.x, float(d.harm_reps[b]), float(d.utility_reps[b]), d.run_id) for d in draws]
        crossing = threshold_sparsity(points, target, floor)
        out[b] = (
            math.log10(crossing.sparsity) if crossing.sparsity else (math.inf if crossing.label != "n/a" else math.nan)
        )
    return out


def _mean_curve(draws: Sequence[Draw], harm: np.ndarray, util: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per sparsity, the mean over runs (seeds, repeats) of each column of harm/utility [runs, replicates]."""
    xs = np.array(sorted({d.x for d in draws}))
    where = np.array([d.x for d in draws])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-undefined column stays NaN
        mean_h = np.stack([np.nanmean(harm[where == x], axis=0) for x in xs])
        mean_u = np.stack([np.nanmean(util[where == x], axis=0) for x in xs])
    return xs, mean_h, mean_u


def selective_area(xs: np.ndarray, harm: np.ndarray, util: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Mean over log10 sparsity in [lo, hi] of harm reduction + utility ratio - 1: the area between the harm
    curve and the utility-loss curve per decade. Above 0: more harm removed than utility lost; higher is better.

    ``harm``/``util`` are [points] or [points, replicates]; points outside [lo, hi] only serve interpolation.
    """
    logs = np.log10(xs)
    a, b = math.log10(lo), math.log10(hi)
    grid = np.unique(np.concatenate([[a, b], logs[(logs > a) & (logs < b)]]))
    gap = np.asarray(harm) + np.asarray(util) - 1.0
    cols = gap.reshape(len(xs), -1)
    out = np.empty(cols.shape[1])
    for j in range(cols.shape[1]):
        ok = np.isfinite(cols[:, j])
        if ok.sum() == 0:
            out[j] = math.nan
            continue
        values = np.interp(grid, logs[ok], cols[ok, j])
        out[j] = values[0] if b == a else np.trapezoid(values, grid) / (b - a)
    return out if gap.ndim > 1 else out[0]


@dataclass
class VariantUncertainty:
    """One variant's figures on every replicate, and the per-seed point figures."""

    draws: list[Draw]
    thresholds: dict[str, np.ndarray]  # target name -> log10 A per replicate
    xs: np.ndarray
    harm_band: tuple[np.ndarray, np.ndarray]  # per sparsity: lo, hi
    utility_band: tuple[np.ndarray, np.ndarray]
    seeds: dict[str, dict[Any, str]]  # target name -> seed -> A label (only with 2+ seeds)
    range: tuple[float, float]

    def area(self, lo: float | None = None, hi: float | None = None) -> tuple[float, np.ndarray]:
        """The selective area over [lo, hi] (default: this curve's range): point value and replicates."""
        return area_of(self.draws, lo or self.range[0], hi or self.range[1])


def area_of(draws: Sequence[Draw], lo: float, hi: float) -> tuple[float, np.ndarray]:
    """The selective area of the runs' mean curve: the measured value and its replicates."""
    point_x, point_h, point_u = _mean_curve(draws, np.array([[d.harm] for d in draws]),
                                            np.array([[d.utility] for d in draws]))  # fmt: skip
    xs, mean_h, mean_u = _mean_curve(draws, np.stack([d.harm_reps for d in draws]),
                                     np.stack([d.utility_reps for d in draws]))  # fmt: skip
    return float(selective_area(point_x, point_h[:, 0], point_u[:, 0], lo, hi)), selective_area(
        xs, mean_h, mean_u, lo, hi
    )


def variant_uncertainty(
    draws: Sequence[Draw], targets: Mapping[str, float], floor: float, level: float
) -> VariantUncertainty | None:
    """Replicate thresholds, curve bands and per-seed thresholds of one variant's curve (None: no draws)."""
    if not draws:
        return None
    draws = sorted(draws, key=lambda d: (d.x, d.run_id))
    harm = np.stack([d.harm_reps for d in draws])
    util = np.stack([d.utility_reps for d in draws])
    xs, mean_h, mean_u = _mean_curve(draws, harm, util)
    tail = (1 - level) / 2

    def band(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanquantile(values, tail, axis=1), np.nanquantile(values, 1 - tail, axis=1)

    seeds = sorted({d.seed for d in draws}, key=str)
    per_seed: dict[str, dict[Any, str]] = {}
    for name, target in targets.items():
        if len(seeds) > 1:
            per_seed[name] = {
                s: threshold_sparsity([CurvePoint(d.x, d.harm, d.utility, d.run_id) for d in draws if d.seed == s],
                                      target, floor).label
                for s in seeds
            }  # fmt: skip
    return VariantUncertainty(
        draws=list(draws),
        thresholds={name: threshold_reps(draws, t, floor) for name, t in targets.items()},
        xs=xs,
        harm_band=band(mean_h),
        utility_band=band(mean_u),
        seeds=per_seed,
        range=(float(xs[0]), float(xs[-1])),
    )


def threshold_interval(reps: np.ndarray, level: float, largest: float) -> dict[str, Any]:
    """A's interval as sparsities and a label; an infinite bound reads '>largest' (not reached up to it)."""
    lo, hi = percentile_interval(reps, level)
    if lo is None or hi is None:
        return {"lo": None, "hi": None, "label": "n/a"}

    def label(v: float) -> str:
        return f">{largest:.0e}" if math.isinf(v) else f"{10**v:.1e}"

    return {"lo": None if math.isinf(lo) else 10**lo, "hi": None if math.isinf(hi) else 10**hi,
            "label": f"[{label(lo)}, {label(hi)}]"}  # fmt: skip


@dataclass(frozen=True)
class Difference:
    """A difference between two variants with its interval, p-value and what may be said about it."""

    first: str
    second: str
    figure: str
    estimate: float | None
    lo: float | None
    hi: float | None
    p: float | None
    verdict: str

    def row(self) -> dict[str, Any]:
        return dict(self.__dict__)


def difference(
    first: str, second: str, figure: str, point: float | None, reps: np.ndarray, level: float, lower: str, higher: str
) -> Difference:
    """first - second; the verdict names the direction only when the interval excludes 0."""
    lo, hi = percentile_interval(reps, level)
    p = p_value(reps)
    if lo is None or hi is None or point is None or math.isnan(point):
        lo = hi = p = None  # e.g. neither variant reaches the target: there is no difference to test
        verdict = "not measurable (too few replicates reach the figure in both)"
    elif lo <= 0 <= hi:
        verdict = "not distinguishable"
    else:
        verdict = f"{first} {lower if hi < 0 else higher}"
    return Difference(first, second, figure, point, lo, hi, p, verdict)


def _log_threshold(sparsity: Any, label: str) -> float:
    if isinstance(sparsity, int | float) and sparsity > 0:
        return math.log10(sparsity)
    return math.inf if label.startswith(">") else math.nan


def differences(
    variants: Mapping[str, tuple[VariantUncertainty, Mapping[str, Any]]], targets: Sequence[str], level: float
) -> list[Difference]:
    """Every pair of variants: log10 A per target (negative: the first needs fewer weights, i.e. is more
    compressed) and the selective area over their common sparsity range (positive: the first is more selective)."""
    out = []
    for (a, (ua, ra)), (b, (ub, rb)) in itertools.combinations(variants.items(), 2):
        for name in targets:
            with np.errstate(invalid="ignore"):
                point = _log_threshold(ra.get(f"{name}_sparsity"), str(ra.get(name))) - _log_threshold(
                    rb.get(f"{name}_sparsity"), str(rb.get(name))
                )
                reps = ua.thresholds[name] - ub.thresholds[name]
            out.append(difference(a, b, f"log10 {name}", point, reps, level, "more compressed", "less compressed"))
        lo, hi = max(ua.range[0], ub.range[0]), min(ua.range[1], ub.range[1])
        if lo <= hi:
            pa, reps_a = ua.area(lo, hi)
            pb, reps_b = ub.area(lo, hi)
            out.append(difference(a, b, f"selective area {lo:.0e}..{hi:.0e}", pa - pb, reps_a - reps_b, level,
                                  "less selective", "more selective"))  # fmt: skip
    return out


@dataclass
class Uncertainty:
    """What the report draws and tabulates: per variant its replicates, and every pairwise difference."""

    variants: dict[str, VariantUncertainty]  # "model/alignment" -> its curve's replicates
    differences: list[Difference]
    without: list[str]  # variants whose runs kept no per-item values (older runs, W&B rows)


def annotate(
    comp: list[dict[str, Any]],
    rows: Sequence[Mapping[str, Any]],
    samples: Mapping[str, Stages],
    targets: Mapping[str, float],
    floor: float,
    resampler: Resampler,
    curve_x: Any,
) -> Uncertainty:
    """Add each compression row's intervals (A per target, between-seed spread, selective area) in place."""
    level = resampler.spec.level
    found: dict[str, tuple[VariantUncertainty, Mapping[str, Any]]] = {}
    without = []
    for row in comp:
        name = f"{row['model']}/{row['alignment']}"
        curve = [r for r in rows if str(r.get("model")) == row["model"] and str(r.get("alignment")) == row["alignment"]
                 and r.get("rule") == row["rule"] and r.get("protect") == row["protect"] and curve_x(r) is not None]  # fmt: skip
        draws = [d for r in curve if (d := run_draw(r, samples.get(str(r["run_id"])), curve_x(r), resampler))]
        unc = variant_uncertainty(draws, targets, floor, level) if len(draws) == len(curve) else None
        seeds = sorted({r.get("seed") for r in curve}, key=str)
        row["n_seeds"] = len(seeds)
        row["n_items"] = _items(curve, samples)
        if unc is None:
            without.append(name)
            continue
        found[name] = (unc, row)
        for target in targets:
            ci = threshold_interval(unc.thresholds[target], level, unc.range[1])
            row.update({f"{target}_ci": ci["label"], f"{target}_lo": ci["lo"], f"{target}_hi": ci["hi"]})
            if target in unc.seeds:
                row[f"{target}_seeds"] = " ".join(f"{s}:{v}" for s, v in unc.seeds[target].items())
        point, reps = unc.area()
        lo, hi = percentile_interval(reps, level)
        row.update({"area": point if math.isfinite(point) else None, "area_lo": lo, "area_hi": hi})
        if len(seeds) > 1:
            per_seed = [area_of([d for d in unc.draws if d.seed == s], *unc.range)[0] for s in seeds]
            row["area_seeds"] = " ".join(f"{s}:{v:.3f}" for s, v in zip(seeds, per_seed, strict=True))
    return Uncertainty({k: v[0] for k, v in found.items()}, differences(found, list(targets), level), without)


def _items(curve: Sequence[Mapping[str, Any]], samples: Mapping[str, Stages]) -> str | None:
    """Held-out items the curve's harm and utility figures rest on, e.g. '16 harmful / 16 benign'."""
    counts: set[tuple[int, int]] = set()
    for r in curve:
        after = (samples.get(str(r["run_id"])) or {}).get("after") or {}
        h = after.get(HARM_MEASURES.get(str(r.get("harm_measure")), ""))
        u = after.get(UTILITY_MEASURES.get(str(r.get("utility_measure")), ""))
        if h is not None and u is not None:
            counts.add((h.n, u.n))
    return " + ".join(f"{h} harmful / {u} benign" for h, u in sorted(counts)) or None


Band = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # xs, harm lo/hi, utility lo/hi


def curve_bands(
    rows: Sequence[Mapping[str, Any]], samples: Mapping[str, Stages], resampler: Resampler, curve_x: Any
) -> dict[tuple[str, str, str, Any], Band]:
    """Per plotted curve (model, alignment, rule, protect): the interval of its mean at each sparsity."""
    groups: dict[tuple[str, str, str, Any], list[Draw]] = {}
    for r in rows:
        x = curve_x(r)
        draw = run_draw(r, samples.get(str(r["run_id"])), x, resampler) if x is not None else None
        if draw is not None:
            key = (str(r.get("model")), str(r.get("alignment")), str(r.get("rule")), r.get("protect"))
            groups.setdefault(key, []).append(draw)
    out = {}
    for key, draws in groups.items():
        unc = variant_uncertainty(draws, {}, 0.0, resampler.spec.level)
        if unc is not None:
            out[key] = (unc.xs, *unc.harm_band, *unc.utility_band)
    return out
