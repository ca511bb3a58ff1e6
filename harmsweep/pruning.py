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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from harmsweep import score_store as store
from harmsweep import structured
from harmsweep.errors import HarmsweepError
from harmsweep.scoring import ScoredParam

RULES = ("signed_snip", "no_set_difference", "unsigned_snip", "magnitude", "random")
SCORE_RULES = ("signed_snip", "no_set_difference", "unsigned_snip")
GRANULARITIES = ("global", "matrix", "row", "nm", "head")
BENIGN_IMPORTANCE = ("abs_signed", "unsigned", "signed")
CRITERIA = ("snip", "wanda")  # scoring.criterion: what the score sets hold
CHOICES = {
    "counts": ("round", "floor"),  # K = round(f * N), or int(f * N) as Wei et al.'s code does
    "ties": ("index", "topk"),  # ties at a threshold: by matrix then flat index, or torch.topk's own order
    "order": ("top", "bottom"),  # prune the highest-ranked weights, or the lowest-ranked
    "replace": ("zero", "base"),  # pruned weights become 0, or the base variant's values
}
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
    granularity: str = "global"  # global | matrix | row | nm (N of every M along a row) | head (attention heads)
    benign_importance: str = "abs_signed"
    seed: int = 0
    counts: str = "round"
    ties: str = "index"
    order: str = "top"
    nm_n: int = 2  # granularity=nm: N weights pruned in every group of M consecutive inputs of a row
    nm_m: int = 4
    replace: str = "zero"
    sequential: bool = False  # score and prune layer by layer, each layer scored with the lower ones pruned
    criterion: str = "snip"

    def validate(self) -> None:
        for field, value, allowed in (
            ("rule", self.rule, RULES),
            ("granularity", self.granularity, GRANULARITIES),
            ("benign_importance", self.benign_importance, BENIGN_IMPORTANCE),
            *((name, getattr(self, name), allowed) for name, allowed in CHOICES.items()),
        ):
            if value not in allowed:
                raise HarmsweepError(f"pruning.{field}={value} is not one of {', '.join(allowed)}")
        if self.criterion not in CRITERIA:
            raise HarmsweepError(f"scoring.criterion={self.criterion} is not one of {', '.join(CRITERIA)}")
        self._validate_combination()
        for field, value in (
            ("sparsity", self.sparsity),
            ("protect", self.protect),
            ("harm_fraction", self.harm_fraction),
        ):
            if value is not None and not 0.0 <= float(value) <= 1.0:
                raise HarmsweepError(f"pruning.{field}={value} must lie in [0, 1]")

    def _validate_combination(self) -> None:
        """Settings that only make sense together fail here, in one line, before any work."""
        if self.ties == "topk" and self.granularity != "matrix":
            raise HarmsweepError(
                "pruning.ties=topk (Wei et al.'s torch.topk per matrix) needs pruning.granularity=matrix"
            )
        if self.granularity == "nm":
            if not 0 < self.nm_n <= self.nm_m:
                raise HarmsweepError(f"pruning.nm_n={self.nm_n} must lie in 1..pruning.nm_m={self.nm_m}")
            if self.harm_fraction is not None:
                raise HarmsweepError(
                    "pruning.granularity=nm fixes the count (nm_n of every nm_m): drop pruning.harm_fraction"
                )
        if self.sequential and self.granularity in ("global", "head"):
            raise HarmsweepError(
                f"pruning.sequential=true prunes each layer before the next is scored, so its counts are per matrix: "
                f"pruning.granularity={self.granularity} needs a whole-model ranking; use matrix, row or nm"
            )

    @property
    def protects(self) -> bool:
        return self.rule in ("signed_snip", "unsigned_snip") and self.protect > 0

    def harm_set(self) -> str | None:
        """The score set the harm ranking comes from (None: magnitude and random need none)."""
        if self.rule not in SCORE_RULES:
            return None
        if self.criterion == "wanda":
            return "harm_wanda"
        return "harm_unsigned" if self.rule == "unsigned_snip" else "harm"

    def benign_set(self) -> str:
        if self.criterion == "wanda":
            return "benign_wanda"
        return "benign_unsigned" if self.benign_importance == "unsigned" else "benign"

    def needed_scores(self) -> set[str]:
        """Score sets this spec reads: 'harm', 'harm_unsigned', 'harm_wanda' and their 'benign' twins."""
        out = {self.harm_set()} - {None}
        if self.protects:
            out.add(self.benign_set())
        return out

    def reads_every_score(self) -> bool:
        """Rankings a compact set (top tails) cannot serve: the low end, or sums over a head."""
        return self.order == "bottom" or self.granularity in ("nm", "head")


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
        return self.spec.harm_set()

    def benign_set(self) -> str:
        return self.spec.benign_set()

    def harm(self, name: str) -> torch.Tensor:
        """Ranking score of the rule (bigger = prune first), with -inf where not eligible.

        order=bottom reverses the ranking over every finite score (the low end: Wei et al.'s default).
        """
        h = self.raw_harm(name)
        if self.spec.order == "bottom":
            return torch.where(torch.isfinite(h), -h, float("-inf"))
        if self.harm_set() == "harm":
            return h.masked_fill_(~(h > 0), float("-inf"))  # only weights whose removal raises the harmful loss
        return h

    def raw_harm(self, name: str) -> torch.Tensor:
        """The rule's ranking values before eligibility: H = -S, an unsigned or Wanda score, -|W|, a draw."""
        kind = self.harm_set()
        if kind is not None:
            return store.ranked(self.scores[kind], name, store.order_of(kind), self.device)
        if self.spec.rule == "magnitude":
            return -self.weights[name].detach().to(self.device, non_blocking=True).float().abs()
        # drawn on the host so that a seed picks the same weights on every device
        gen = torch.Generator().manual_seed(self.spec.seed * 1_000_003 + zlib.crc32(name.encode()))
        return torch.rand(self.weights[name].shape, generator=gen).to(self.device)

    def benign(self, name: str) -> torch.Tensor:
        kind = self.benign_set()
        return store.ranked(self.scores[kind], name, store.order_of(kind, self.spec.benign_importance), self.device)

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


def count(spec: PruneSpec, fraction: float, size: int) -> int:
    """How many of ``size`` a fraction selects: rounded, or floored like Wei et al.'s ``int(p * numel)``."""
    return int(fraction * size) if spec.counts == "floor" else round(fraction * size)


def select(
    spec: PruneSpec,
    params: Mapping[str, ScoredParam],
    weights: Mapping[str, torch.Tensor],
    scores: Mapping[str, Mapping[str, torch.Tensor]],
    device: torch.device | str | None = None,
    head_dim: int | None = None,
) -> dict[str, torch.Tensor]:
    """Flat indices (sorted int64, on the host) of the weights to prune, per parameter name.

    ``device``: where the matrices are ranked (default: where the scores are); run.py passes the GPU.
    ``head_dim``: the attention head size, read by granularity=head only.
    """
    spec.validate()
    views = _Scores(spec, weights, scores, device)
    names = list(params)
    if spec.granularity == "row":
        return {n: _select_rows(spec, views, n, params[n].rows_dim) for n in names}
    if spec.granularity == "nm":
        return {n: structured.select_nm(spec, views, n, params[n].rows_dim) for n in names}
    if spec.granularity == "head":
        return structured.select_heads(spec, views, params, weights, head_dim)
    if spec.ties == "topk":
        return {n: _select_topk(spec, views, n) for n in names}
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
        k_protect = count(spec, spec.protect, size)
        protected = top_k_threshold(unit, benign_keys, k_protect)
        views.check("benign", unit, protected.available, k_protect)

    def protected_mask(n: str) -> torch.Tensor:
        return protected.mask(n, benign_keys(n)) if spec.protects else torch.zeros((), dtype=torch.bool)

    def harm_keys(n: str) -> torch.Tensor:
        h = views.harm(n)
        keys = float_keys(h).masked_fill_(h == float("-inf"), EXCLUDED)
        return keys if fractions else keys.masked_fill_(protected_mask(n), EXCLUDED)

    k = count(spec, spec.harm_fraction if fractions else spec.sparsity, size)
    chosen = top_k_threshold(unit, harm_keys, k)
    if spec.rule in SCORE_RULES:
        views.check("harm", unit, chosen.available, k)
    out = {}
    for n in unit:
        mask = chosen.mask(n, harm_keys(n))
        if fractions:
            mask &= ~protected_mask(n)
        out[n] = torch.nonzero(mask.view(-1)).view(-1).cpu()
    return out


def _select_topk(spec: PruneSpec, views: _Scores, name: str) -> torch.Tensor:
    """Wei et al.'s set difference as their code runs it: ``torch.topk`` of each flattened ranking, then
    ``isin``, so ties at a threshold fall the way torch.topk breaks them (with pruning.counts=floor: their counts)."""

    def top(values: torch.Tensor, k: int) -> torch.Tensor:
        idx = torch.topk(values, min(k, values.numel())).indices
        return idx[values[idx] > float("-inf")]  # entries a compact set does not hold, or not eligible

    harm = views.harm(name).view(-1)
    size = harm.numel()
    fractions = spec.harm_fraction is not None
    protected = torch.zeros(0, dtype=torch.long, device=harm.device)
    if spec.protects:
        k_protect = count(spec, spec.protect, size)
        benign = views.benign(name).view(-1)
        views.check("benign", [name], int((benign > float("-inf")).sum()), k_protect)
        protected = top(benign, k_protect)
    k = count(spec, spec.harm_fraction if fractions else spec.sparsity, size)
    if not fractions:
        harm = harm.clone()
        harm[protected] = float("-inf")
    if spec.rule in SCORE_RULES:
        views.check("harm", [name], int((harm > float("-inf")).sum()), k)
    chosen = top(harm, k)
    if fractions:
        chosen = chosen[~torch.isin(chosen, protected)]
    return torch.sort(chosen).values.cpu()


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
    k_protect = count(spec, spec.protect, width)
    if spec.protects and k_protect > 0:
        idx, kept = row_top(rows(views.benign(name)), k_protect)
        views.check_rows("benign", name, kept.sum(1), k_protect)
        blocked.scatter_(1, idx, kept)
    fractions = spec.harm_fraction is not None
    k = count(spec, spec.harm_fraction if fractions else spec.sparsity, width)
    mask = torch.zeros_like(blocked)
    if k > 0:
        ranked = harm if fractions else harm.masked_fill(blocked, float("-inf"))
        idx, kept = row_top(ranked, k)
        if spec.rule in SCORE_RULES:
            views.check_rows("harm", name, kept.sum(1), k)
        mask.scatter_(1, idx, kept)
        if fractions:
            mask &= ~blocked
    return torch.nonzero(rows(mask).reshape(-1)).view(-1).cpu()
