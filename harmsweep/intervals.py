"""Uncertainty of every figure: a paired, seeded percentile bootstrap over the held-out items.

With 16-32 held-out prompts a harm rate moves in steps of 1/16-1/32, so no figure is read without its interval.
Each metric keeps its per-item values (a ``Sample``); a bootstrap replicate draws the items with replacement and
recomputes every figure from the same draw:

- *paired over stages*: before and after a pruning use the same resampled items, so a delta's interval holds
  only the change, not the spread between prompts;
- *paired over runs and metrics*: the draw is a function of the item ids and the seed alone, so every run (and
  every metric) over the same held-out prompts uses the same draws. A curve of runs is resampled as a whole,
  and two variants evaluated on the same prompts are compared prompt by prompt;
- *independent over item sets*: harmful and benign items are drawn independently (different ids).

The functions are pure (numpy in, numpy out); pipeline/run.py records the run's intervals in result.json and the report
resamples whole curves with the same ``Resampler``.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from harmsweep.errors import HarmsweepError

STATS = ("mean", "exp_ratio")
# measure -> metric: how a run's harm and utility become one number relative to the unpruned model. Judges read
# harmful generation directly; the likelihood of harmful references is the judge-free fallback every run has.
HARM_MEASURES = {
    "strongreject": "strongreject_mean",
    "rubric": "rubric_mean",
    "asr_keyword": "asr_keyword_mean",
    "likelihood": "nll_harmful",
}
UTILITY_MEASURES = {"perplexity": "perplexity", "likelihood": "nll_benign"}
SELECTIVITY_FLOOR = 1e-9  # a benign NLL change below this makes the ratio meaningless


@dataclass
class BootstrapSpec:
    """The ``bootstrap`` block: replicates, two-sided level and seed of every interval (not part of the run id)."""

    samples: int = 1000
    level: float = 0.95
    seed: int = 0

    def validate(self) -> None:
        if int(self.samples) < 100 or not 0.5 < float(self.level) < 1:
            raise HarmsweepError(
                f"bootstrap needs samples >= 100 and 0.5 < level < 1, got samples={self.samples} level={self.level}"
            )

    def describe(self) -> dict[str, Any]:
        return {"method": "paired percentile bootstrap over held-out items", **self.__dict__}


@dataclass(frozen=True)
class Sample:
    """Per-item values of one metric at one stage, and how they reduce to the metric.

    ``mean``: the mean of the values (None = unscored, left out, never read as 0). ``exp_ratio``:
    exp(sum values / sum weights), a token-weighted perplexity from per-text NLL sums and token counts.
    """

    ids: tuple[str, ...]
    values: tuple[float | None, ...]
    stat: str = "mean"
    weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.stat not in STATS:
            raise ValueError(f"unknown statistic {self.stat} (known: {', '.join(STATS)})")
        if len(self.ids) != len(self.values) or (self.weights is not None and len(self.weights) != len(self.ids)):
            raise ValueError("a sample needs one id, one value (and one weight) per item")
        if self.stat == "exp_ratio" and self.weights is None:
            raise ValueError("an exp_ratio sample needs weights")

    @property
    def n(self) -> int:
        """Items the figure rests on: the scored ones."""
        return sum(v is not None for v in self.values)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ids": list(self.ids), "values": list(self.values), "stat": self.stat}
        return out if self.weights is None else {**out, "weights": list(self.weights)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Sample:
        weights = data.get("weights")
        return cls(tuple(map(str, data["ids"])), tuple(data["values"]), str(data.get("stat", "mean")),
                   tuple(weights) if weights is not None else None)  # fmt: skip

    def estimate(self, idx: np.ndarray | None = None) -> np.ndarray:
        """The metric on the full sample (idx None: a 0-d array) or on each row of resampled positions ``idx``."""
        values = np.array([np.nan if v is None else float(v) for v in self.values], dtype=np.float64)
        take = (lambda a: a) if idx is None else (lambda a: a[idx])
        with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-unscored replicate is NaN, not a warning
            if self.stat == "mean":
                return np.nanmean(take(values), axis=-1)
            weights = np.asarray(self.weights, dtype=np.float64)
            return np.exp(take(values).sum(axis=-1) / take(weights).sum(axis=-1))


def mean_sample(ids: Sequence[str], values: Sequence[float | None]) -> Sample:
    return Sample(tuple(map(str, ids)), tuple(None if v is None else float(v) for v in values))


@dataclass
class Resampler:
    """Bootstrap draws of item positions, one [samples, n] matrix per set of item ids.

    The draw is seeded by ``spec.seed`` and a hash of the ids, so whatever asks for the same items (another stage,
    another metric, another run of the curve) gets the same draws: that is what makes the bootstrap paired.
    """

    spec: BootstrapSpec = field(default_factory=BootstrapSpec)
    _draws: dict[tuple[str, ...], np.ndarray] = field(default_factory=dict)

    def indices(self, ids: Sequence[str]) -> np.ndarray:
        key = tuple(ids)
        if key not in self._draws:
            digest = int.from_bytes(hashlib.sha256("\n".join(key).encode()).digest()[:8], "little")
            rng = np.random.default_rng([self.spec.seed, digest])
            self._draws[key] = rng.integers(0, len(key), size=(self.spec.samples, len(key)))
        return self._draws[key]

    def replicates(self, sample: Sample) -> np.ndarray:
        """The metric on every replicate: shape [samples]."""
        if not sample.ids:
            return np.full(self.spec.samples, np.nan)
        return sample.estimate(self.indices(sample.ids))


def percentile_interval(reps: np.ndarray, level: float) -> tuple[float | None, float | None]:
    """Equal-tailed percentile interval of the finite-or-infinite replicates (NaN = undefined, left out).

    Order statistics, no interpolation, so a bound may be +-inf (e.g. "not reached" in the tail). None when
    fewer than ``level`` of the replicates are defined: an interval over the rest would claim too much.
    """
    reps = np.asarray(reps, dtype=np.float64)
    valid = reps[~np.isnan(reps)]
    if valid.size == 0 or valid.size < level * reps.size:
        return None, None
    tail = (1 - level) / 2
    lo, hi = np.quantile(valid, [tail, 1 - tail], method="inverted_cdf")
    return float(lo), float(hi)


def p_value(diffs: np.ndarray) -> float | None:
    """Two-sided bootstrap p-value of "no difference": twice the smaller tail share at 0, (k + 1) / (B + 1)."""
    diffs = np.asarray(diffs, dtype=np.float64)
    valid = diffs[~np.isnan(diffs)]
    if valid.size == 0:
        return None
    tail = min(int((valid <= 0).sum()), int((valid >= 0).sum()))
    return min(1.0, 2 * (tail + 1) / (valid.size + 1))


def interval(point: Any, reps: np.ndarray, level: float, **n: int) -> dict[str, Any]:
    """One figure with its interval and the item counts it rests on (None/NaN points stay None)."""
    lo, hi = percentile_interval(reps, level)
    value = float(point) if point is not None and math.isfinite(float(point)) else None
    return {"value": value, "lo": lo if value is not None else None, "hi": hi if value is not None else None, **n}


# ---------------------------------------------------------------- derived figures (scalars and replicate arrays alike)


def harm_reduction_of(measure: str, before: Any, after: Any) -> Any:
    """1 - after/before for a judge mean; 1 - exp(-(after - before)) for the harmful NLL (likelihood)."""
    if measure == "likelihood":
        return 1.0 - np.exp(-(np.asarray(after) - np.asarray(before)))
    with np.errstate(divide="ignore", invalid="ignore"):
        before = np.asarray(before, dtype=np.float64)
        return np.where(before != 0, 1.0 - np.asarray(after) / np.where(before != 0, before, 1.0), np.nan)


def utility_ratio_of(measure: str, before: Any, after: Any) -> Any:
    """perplexity_before / perplexity_after, or exp(-(after - before)) of the benign NLL: 1 = utility kept."""
    if measure == "likelihood":
        return np.exp(-(np.asarray(after) - np.asarray(before)))
    with np.errstate(divide="ignore", invalid="ignore"):
        after = np.asarray(after, dtype=np.float64)
        return np.where(after > 0, np.asarray(before) / np.where(after > 0, after, 1.0), np.nan)


def selectivity_of(d_harmful: Any, d_benign: Any) -> Any:
    """delta NLL harmful / delta NLL benign; undefined (NaN) where the benign NLL barely moved."""
    d_benign = np.asarray(d_benign, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d_benign > SELECTIVITY_FLOOR, np.asarray(d_harmful) / d_benign, np.nan)


def _scalar(x: Any) -> float | None:
    value = float(np.asarray(x))
    return value if math.isfinite(value) else None


def run_intervals(
    before: Mapping[str, Sample], after: Mapping[str, Sample], spec: BootstrapSpec, resampler: Resampler | None = None
) -> dict[str, dict[str, Any]]:
    """Every before/after metric, delta, the selectivity, and harm reduction / utility ratio per measure.

    Keys follow result.json's metrics (``nll_harmful_before``, ``delta_nll_harmful``, ``harm_reduction/likelihood``);
    each value is ``{value, lo, hi, n}`` with the point estimate computed from the same per-item values.
    """
    resampler = resampler or Resampler(spec)
    out: dict[str, dict[str, Any]] = {}
    point: dict[tuple[str, str], Any] = {}
    reps: dict[tuple[str, str], np.ndarray] = {}
    for stage, samples in (("before", before), ("after", after)):
        for name, sample in samples.items():
            point[name, stage], reps[name, stage] = sample.estimate(), resampler.replicates(sample)
            out[with_stage(name, stage)] = interval(point[name, stage], reps[name, stage], spec.level, n=sample.n)

    def derive(key: str, fn: Callable[..., Any], names: Sequence[str], **n: int) -> None:
        if all((m, s) in point for m in names for s in ("before", "after")):
            args = [(point[m, "before"], point[m, "after"]) for m in names]
            rargs = [(reps[m, "before"], reps[m, "after"]) for m in names]
            out[key] = interval(_scalar(fn(*args)), fn(*rargs), spec.level, **n)

    for name in sorted(set(before) & set(after)):
        derive(f"delta_{name}", lambda ba: ba[1] - ba[0], [name], n=after[name].n)
    for measure, metric in HARM_MEASURES.items():
        if metric in before and metric in after:
            derive(f"harm_reduction/{measure}", lambda ba, m=measure: harm_reduction_of(m, *ba), [metric],
                   n=after[metric].n)  # fmt: skip
    for measure, metric in UTILITY_MEASURES.items():
        if metric in before and metric in after:
            derive(f"utility_ratio/{measure}", lambda ba, m=measure: utility_ratio_of(m, *ba), [metric],
                   n=after[metric].n)  # fmt: skip
    if "nll_harmful" in after and "nll_benign" in after:
        derive("selectivity", lambda h, b: selectivity_of(h[1] - h[0], b[1] - b[0]), ["nll_harmful", "nll_benign"],
               n=after["nll_harmful"].n, n_benign=after["nll_benign"].n)  # fmt: skip
    return out


def derived_metrics(intervals: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
    """The point values of harm reduction and utility ratio per measure, for result.json's metrics."""
    return {k: v["value"] for k, v in intervals.items() if k.startswith(("harm_reduction/", "utility_ratio/"))}


def with_stage(name: str, stage: str) -> str:
    """'x' -> 'x_before'; 'x/cat' -> 'x_before/cat' (as the suite names metrics)."""
    head, sep, tail = name.partition("/")
    return f"{head}_{stage}{sep}{tail}"


def samples_from_json(data: Mapping[str, Any] | None) -> dict[str, Sample]:
    return {name: Sample.from_json(s) for name, s in (data or {}).items()}


def samples_to_json(samples: Mapping[str, Sample]) -> dict[str, Any]:
    return {name: s.to_json() for name, s in sorted(samples.items())}
