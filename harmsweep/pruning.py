"""Masks: which weights to zero, from harm scores H = -S_harm and benign importance U.

The paper's rule is a set difference: the top harm-promoting weights minus the top benign-important
ones. Sized by a target count (default: protect a fraction p by U, then take exactly
K = round(sparsity * N) weights down the H ranking, skipping protected and non-positive ones) or by
fractions (TopK_q(H) minus TopK_p(U), count measured afterwards). Baselines prune the same count.

Global selection never sorts or copies all scores: it streams the matrices through a radix select
on the float bit patterns (two 65,536-bin histogram passes, plus a tie pass when needed) and keeps
only a threshold, so it scales to 7e9 scores with one matrix-sized temporary at a time.
Masks are stored as flat indices per parameter: K entries, not N.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from harmsweep import score_store as store
from harmsweep.artifacts import atomic_path
from harmsweep.errors import HarmsweepError
from harmsweep.scoring import ScoredParam

RULES = ("signed_snip", "no_set_difference", "unsigned_snip", "magnitude", "random")
GRANULARITIES = ("global", "matrix", "row")
BENIGN_IMPORTANCE = ("abs_signed", "unsigned", "signed")
_BINS = 1 << 16
_HALF = 1 << 15  # shifts the signed high half of a key into a bin index
_TAKE_ALL = -1


@dataclass(frozen=True)
class PruneSpec:
    """How to choose the weights to prune; every field is a config option of the same name."""

    rule: str = "signed_snip"
    sparsity: float = 1e-5  # target count K = round(sparsity * N) per granularity unit
    protect: float = 0.01  # fraction p of each unit protected by benign importance U
    harm_fraction: float | None = None  # q: when set, prune TopK_q(H) minus TopK_p(U) instead
    granularity: str = "global"
    benign_importance: str = "abs_signed"
    seed: int = 0

    def validate(self) -> None:
        for field, value, allowed in (
            ("rule", self.rule, RULES),
            ("granularity", self.granularity, GRANULARITIES),
            ("benign_importance", self.benign_importance, BENIGN_IMPORTANCE),
        ):
            if value not in allowed:
                raise HarmsweepError(f"pruning.{field}={value} is not one of {', '.join(allowed)}")
        for field, value in (
            ("sparsity", self.sparsity),
            ("protect", self.protect),
            ("harm_fraction", self.harm_fraction),
        ):
            if value is not None and not 0.0 <= float(value) <= 1.0:
                raise HarmsweepError(f"pruning.{field}={value} must lie in [0, 1]")

    @property
    def protects(self) -> bool:
        return self.rule in ("signed_snip", "unsigned_snip") and self.protect > 0

    def needed_scores(self) -> set[str]:
        """Score sets this spec reads: 'harm', 'harm_unsigned', 'benign', 'benign_unsigned'."""
        need = {"signed_snip": {"harm"}, "no_set_difference": {"harm"}, "unsigned_snip": {"harm_unsigned"}}
        out = set(need.get(self.rule, set()))
        if self.protects:
            out.add("benign_unsigned" if self.benign_importance == "unsigned" else "benign")
        return out


# ---------------------------------------------------------------- streaming top-k (pure functions)


EXCLUDED = torch.iinfo(torch.int32).min  # only NaN bit patterns map here, so it marks "not eligible"


def float_keys(x: torch.Tensor) -> torch.Tensor:
    """Order-preserving map of float32 values to int32 keys (negative floats get their magnitude bits flipped)."""
    bits = x.detach().float().contiguous().view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@dataclass(frozen=True)
class Threshold:
    """The k largest keys of a stream: every key above ``key``, plus ``ties[name]`` equal ones per matrix."""

    key: int | None  # None selects nothing
    ties: Mapping[str, int]  # per matrix: how many keys == key to take, in flat order (-1: all)
    available: int = 0  # eligible keys in the stream: fewer than k means every one was taken

    def mask(self, name: str, keys: torch.Tensor) -> torch.Tensor:
        if self.key is None:
            return torch.zeros_like(keys, dtype=torch.bool)
        mask = keys > self.key
        quota = self.ties.get(name, 0)
        if quota == _TAKE_ALL:
            return mask | (keys == self.key)
        if quota > 0:
            mask.view(-1)[torch.nonzero((keys == self.key).view(-1)).view(-1)[:quota]] = True
        return mask


def top_k_threshold(names: Sequence[str], keys_of: Callable[[str], torch.Tensor], k: int) -> Threshold:
    """Exact top-k over the keys of many matrices, streamed: radix select on 16+16 bits.

    ``keys_of(name)`` returns a matrix's keys (``float_keys``), with EXCLUDED where an entry is not eligible.
    Ties at the threshold are broken by matrix order, then flat index, so the result is deterministic.
    The histograms live on the device of the first matrix's keys (each matrix's counts join them
    there), and no step depends on data until a pass is complete: one host sync per pass, not per matrix.
    """
    if k <= 0:
        return Threshold(None, {})
    high: torch.Tensor | None = None
    for name in names:
        keys = keys_of(name)
        counts = _counts((keys >> 16) + _HALF, keys != EXCLUDED, _BINS)
        high = counts if high is None else high.add_(counts.to(high.device))
    if high is None:
        return Threshold(None, {})
    high[0] = 0  # bin 0 holds EXCLUDED (and negative NaN bit patterns): never eligible
    host_high = high.cpu()
    total = int(host_high.sum())
    if total == 0:
        return Threshold(None, {})
    available = total
    k = min(k, total)
    hi, above = _bucket_from_top(host_high, k)
    low: torch.Tensor | None = None
    for name in names:
        keys = keys_of(name)
        counts = _counts(keys & 0xFFFF, (keys >> 16) == hi - _HALF, _BINS)
        low = counts if low is None else low.add_(counts.to(low.device))
    host_low = low.cpu()
    lo, above_lo = _bucket_from_top(host_low, k - above)
    key = (hi - _HALF) * _BINS + lo
    ties_needed = k - above - above_lo
    if ties_needed == int(host_low[lo]):
        return Threshold(key, {name: _TAKE_ALL for name in names}, available)
    ties: dict[str, int] = {}
    for name in names:
        if ties_needed == 0:
            break
        count = int((keys_of(name) == key).sum())
        ties[name] = min(count, ties_needed)
        ties_needed -= ties[name]
    return Threshold(key, ties, available)


def _counts(bins: torch.Tensor, keep: torch.Tensor, n: int) -> torch.Tensor:
    """Histogram of ``bins`` where ``keep``, on their device.

    On the CPU boolean indexing is cheapest. Elsewhere it would wait for the device (its output size
    depends on the data), so entries not kept count into an extra bin that is dropped: no sync per matrix.
    """
    if bins.device.type == "cpu":
        return torch.bincount(bins[keep].view(-1), minlength=n)
    return torch.bincount(torch.where(keep, bins, n).view(-1), minlength=n + 1)[:n]


def _bucket_from_top(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """Bucket holding the k-th largest element and the number of elements in higher buckets."""
    from_top = hist.flip(0).cumsum(0)
    i = int(torch.searchsorted(from_top, torch.tensor(k)))
    bucket = _BINS - 1 - i
    return bucket, int(from_top[i]) - int(hist[bucket])


# ---------------------------------------------------------------- rules


class _Scores:
    """Per-matrix ranking values of the score sets a rule needs, on the compute device; one matrix at a time.

    Scores may sit anywhere (host memory after scoring, a GPU, several GPUs with a device map, a compact
    file of top tails): each view moves just its matrix to ``device``, so a GPU ranks 7e9 scores with one
    matrix-sized temporary. Entries that are not eligible (or not stored) read -inf and are never chosen.
    """

    def __init__(
        self,
        spec: PruneSpec,
        weights: Mapping[str, torch.Tensor],
        scores: Mapping[str, Mapping[str, torch.Tensor] | store.TailScores],
        device: torch.device | str | None = None,
    ):
        missing = spec.needed_scores() - set(scores)
        if missing:
            raise ValueError(f"rule {spec.rule} needs score sets {sorted(missing)}")
        self.spec, self.weights, self.scores = spec, weights, scores
        for kind in spec.needed_scores():
            if isinstance(scores[kind], store.TailScores):
                scores[kind].require_unit(spec.granularity)
        if device is None:
            dense = (g for g in scores.values() if not isinstance(g, store.TailScores))
            first = next((t for group in (*dense, weights) for t in group.values()), None)
            device = first.device if first is not None else "cpu"
        self.device = torch.device(device)

    def harm_set(self) -> str | None:
        return {"signed_snip": "harm", "no_set_difference": "harm", "unsigned_snip": "harm_unsigned"}.get(
            self.spec.rule
        )

    def benign_set(self) -> str:
        return "benign_unsigned" if self.spec.benign_importance == "unsigned" else "benign"

    def harm(self, name: str) -> torch.Tensor:
        """Ranking score of the rule (bigger = prune first), with -inf where not eligible."""
        rule = self.spec.rule
        if rule in ("signed_snip", "no_set_difference"):
            h = store.ranked(self.scores["harm"], name, "neg", self.device)
            return h.masked_fill_(~(h > 0), float("-inf"))  # only weights whose removal raises the harmful loss
        if rule == "unsigned_snip":
            return store.ranked(self.scores["harm_unsigned"], name, "pos", self.device)
        if rule == "magnitude":
            return -self.weights[name].detach().to(self.device, non_blocking=True).float().abs()
        # drawn on the host so that a seed picks the same weights on every device
        gen = torch.Generator().manual_seed(self.spec.seed * 1_000_003 + zlib.crc32(name.encode()))
        return torch.rand(self.weights[name].shape, generator=gen).to(self.device)

    def benign(self, name: str) -> torch.Tensor:
        order = {"unsigned": "pos", "abs_signed": "abs", "signed": "neg"}[self.spec.benign_importance]
        return store.ranked(self.scores[self.benign_set()], name, order, self.device)

    def check(self, side: str, unit: list[str], available: int, k: int) -> None:
        """Stop when a top-k reached past a compact set's stored tail (the dense set would answer differently)."""
        kind = self.harm_set() if side == "harm" else self.benign_set()
        scores = self.scores.get(kind) if kind else None
        label = "*" if self.spec.granularity == "global" else unit[0]
        if scores is not None and store.short(scores, label, available, k):
            raise scores.too_short(f"pruning ({side} side)", k, label)

    def check_rows(self, side: str, name: str, available: torch.Tensor, k: int) -> None:
        kind = self.harm_set() if side == "harm" else self.benign_set()
        scores = self.scores.get(kind) if kind else None
        if isinstance(scores, store.TailScores) and scores.short_rows(name, available, k):
            raise scores.too_short(f"pruning per row ({side} side)", k, name)


def _count(fraction: float, size: int) -> int:
    return round(fraction * size)


def select(
    spec: PruneSpec,
    params: Mapping[str, ScoredParam],
    weights: Mapping[str, torch.Tensor],
    scores: Mapping[str, Mapping[str, torch.Tensor]],
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Flat indices (sorted int64, on the host) of the weights to prune, per parameter name.

    ``device``: where the matrices are ranked (default: where the scores are); run.py passes the GPU.
    """
    spec.validate()
    views = _Scores(spec, weights, scores, device)
    names = list(params)
    if spec.granularity == "row":
        return {n: _select_rows(spec, views, n, params[n].rows_dim) for n in names}
    units = [names] if spec.granularity == "global" else [[n] for n in names]
    out: dict[str, torch.Tensor] = {}
    for unit in units:
        out.update(_select_unit(spec, views, unit, sum(weights[n].numel() for n in unit)))
    return out


def _select_unit(spec: PruneSpec, views: _Scores, unit: list[str], size: int) -> dict[str, torch.Tensor]:
    """Target count or fractions over one ranking unit (all matrices, or one), streamed per matrix."""
    fractions = spec.harm_fraction is not None

    def benign_keys(n: str) -> torch.Tensor:
        u = views.benign(n)
        return float_keys(u).masked_fill_(u == float("-inf"), EXCLUDED)

    protected = Threshold(None, {})
    if spec.protects:
        k_protect = _count(spec.protect, size)
        protected = top_k_threshold(unit, benign_keys, k_protect)
        views.check("benign", unit, protected.available, k_protect)

    def protected_mask(n: str) -> torch.Tensor:
        return protected.mask(n, benign_keys(n)) if spec.protects else torch.zeros((), dtype=torch.bool)

    def harm_keys(n: str) -> torch.Tensor:
        h = views.harm(n)
        keys = float_keys(h).masked_fill_(h == float("-inf"), EXCLUDED)
        return keys if fractions else keys.masked_fill_(protected_mask(n), EXCLUDED)

    k = _count(spec.harm_fraction if fractions else spec.sparsity, size)
    chosen = top_k_threshold(unit, harm_keys, k)
    if spec.rule in ("signed_snip", "no_set_difference", "unsigned_snip"):
        views.check("harm", unit, chosen.available, k)
    out = {}
    for n in unit:
        mask = chosen.mask(n, harm_keys(n))
        if fractions:
            mask &= ~protected_mask(n)
        out[n] = torch.nonzero(mask.view(-1)).view(-1).cpu()
    return out


def row_top(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the column indices of the k largest values, ties by column (a stable sort), and which are > -inf."""
    idx = torch.sort(x, dim=1, descending=True, stable=True).indices[:, :k]
    return idx, torch.gather(x, 1, idx) > float("-inf")


def _select_rows(spec: PruneSpec, views: _Scores, name: str, rows_dim: int) -> torch.Tensor:
    """Per output row: the same rule with quotas round(fraction * row length) in every row."""

    def rows(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(0, 1) if rows_dim == 1 else t

    harm = rows(views.harm(name))
    width = harm.size(1)
    blocked = torch.zeros_like(harm, dtype=torch.bool)
    k_protect = _count(spec.protect, width)
    if spec.protects and k_protect > 0:
        idx, kept = row_top(rows(views.benign(name)), k_protect)
        views.check_rows("benign", name, kept.sum(1), k_protect)
        blocked.scatter_(1, idx, kept)
    fractions = spec.harm_fraction is not None
    k = _count(spec.harm_fraction if fractions else spec.sparsity, width)
    mask = torch.zeros_like(blocked)
    if k > 0:
        ranked = harm if fractions else harm.masked_fill(blocked, float("-inf"))
        idx, kept = row_top(ranked, k)
        if spec.rule in ("signed_snip", "no_set_difference", "unsigned_snip"):
            views.check_rows("harm", name, kept.sum(1), k)
        mask.scatter_(1, idx, kept)
        if fractions:
            mask &= ~blocked
    return torch.nonzero(rows(mask).reshape(-1)).view(-1).cpu()


# ---------------------------------------------------------------- applying and reporting


def apply_mask(model: torch.nn.Module, mask: Mapping[str, torch.Tensor]) -> None:
    """Zero the selected weights in place."""
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, idx in mask.items():
            if idx.numel():
                named[name].view(-1)[idx.to(named[name].device)] = 0


@contextmanager
def pruned(model: torch.nn.Module, mask: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Zero the selected weights for the duration of the block, then put their values back.

    Experiments compare many masks on one loaded model; restoring only the masked entries costs
    K values instead of a copy of the model.
    """
    named = dict(model.named_parameters())
    saved = {n: named[n].detach().view(-1)[idx.to(named[n].device)].clone() for n, idx in mask.items() if idx.numel()}
    apply_mask(model, mask)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, values in saved.items():
                named[name].view(-1)[mask[name].to(values.device)] = values


def mask_counts(params: Mapping[str, ScoredParam], mask: Mapping[str, torch.Tensor]) -> dict[str, dict[str, int]]:
    """Pruned weights per decoder layer and per module type (q_proj, down_proj, ...)."""
    per_layer: Counter[str] = Counter()
    per_type: Counter[str] = Counter()
    for name, idx in mask.items():
        per_layer[str(params[name].layer)] += idx.numel()
        per_type[params[name].module_type] += idx.numel()
    layers = sorted({str(p.layer) for p in params.values()}, key=int)
    types = sorted({p.module_type for p in params.values()})
    return {"per_layer": {k: per_layer[k] for k in layers}, "per_module_type": {k: per_type[k] for k in types}}


def save_mask(mask: Mapping[str, torch.Tensor], path: str | Path) -> None:
    with atomic_path(path) as tmp:
        save_file({n: t.contiguous() for n, t in mask.items()}, str(tmp))


def load_mask(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))
