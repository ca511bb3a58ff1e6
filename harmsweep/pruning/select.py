"""Masks: which weights to zero, from harm scores H = -S_harm and benign importance U.

The paper's rule is a set difference: the top harm-promoting weights minus the top benign-important
ones. Sized by a target count (default: protect a fraction p by U, then take exactly
K = round(sparsity * N) weights down the H ranking, skipping protected and non-positive ones) or by
fractions (TopK_q(H) minus TopK_p(U), count measured afterwards). Baselines prune the same count.

Global selection never sorts or copies all scores: it streams the matrices through a radix select
on the float bit patterns (two 65,536-bin histogram passes, plus a tie pass when needed) and keeps
only a threshold, so it scales to 7e9 scores with one matrix-sized temporary at a time. From compact
score sets, global and per-matrix selection rank the stored tails alone (about 1% of the scores).
Masks are stored as flat indices per parameter: K entries, not N.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import replace

import torch

from harmsweep.errors import HarmsweepError
from harmsweep.models.parts import ScoredParam
from harmsweep.pruning import structured
from harmsweep.pruning.spec import SCORE_RULES, PruneSpec, count
from harmsweep.scoring import store
from harmsweep.scoring.topk import EXCLUDED, Threshold, float_keys, row_top, top_k_of_tails, top_k_threshold

Size = int | tuple[int, ...]  # a ranking unit's size: a count (global), or one matrix's shape

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
        if self.positive_only():
            return h.masked_fill_(~(h > 0), float("-inf"))  # only weights whose removal raises the harmful loss
        return h

    def positive_only(self) -> bool:
        """pruning.eligible=positive on signed scores: H <= 0 is never pruned (eligible=all: the authors' top-k)."""
        return self.harm_set() == "harm" and self.spec.eligible == "positive"

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

    def reads_tails(self) -> bool:
        """Whether a top-k can run on the stored tails alone: every set compact, a top-down rule read per
        global or matrix unit (rows, N:M, heads and ties=topk keep the dense path)."""
        spec = self.spec
        return (
            spec.rule in SCORE_RULES
            and spec.granularity in ("global", "matrix")
            and spec.order == "top"
            and spec.ties == "index"
            and all(isinstance(self.scores[kind], store.TailScores) for kind in spec.needed_scores())
        )

    def harm_tail(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat indices and keys (EXCLUDED where not eligible) of the harm set's stored tail, on the device."""
        kind = self.harm_set()
        assert kind is not None
        idx, h = self.scores[kind].tail(name, store.order_of(kind), self.device)
        return idx, float_keys(h).masked_fill_(~(h > 0) if self.positive_only() else h == float("-inf"), EXCLUDED)

    def benign_tail(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        kind = self.benign_set()
        order = store.order_of(kind, self.spec.benign_importance)
        idx, u = self.scores[kind].tail(name, order, self.device)
        return idx, float_keys(u).masked_fill_(u == float("-inf"), EXCLUDED)

    def check(self, side: str, unit: list[str], available: int, k: int) -> None:
        """Stop when a top-k reached past a compact set's stored tail (the dense set would answer differently)."""
        kind = self.harm_set() if side == "harm" else self.benign_set()
        scores = self.scores.get(kind) if kind else None
        label = "*" if self.spec.granularity == "global" else unit[0]
        if scores is not None and store.short(scores, label, available, k):
            raise scores.too_short(f"pruning ({side} side)", k, label)
        if side == "harm" and self._positives_only_stored() and available < k:
            raise self._signs_error(k, label)

    def _positives_only_stored(self) -> bool:
        """A compact signed harm set stores H > 0 only: eligible=all cannot reach below it (a dense set can)."""
        kind = self.harm_set()
        return kind == "harm" and not self.positive_only() and isinstance(self.scores[kind], store.TailScores)

    @staticmethod
    def _signs_error(k: int | str, label: str) -> HarmsweepError:
        return HarmsweepError(
            f"pruning.eligible=all takes the top {k} of H whatever its sign in unit {label}, and the compact "
            "harm set stores only H > 0, which holds fewer: use scores.store=dense"
        )

    def check_rows(self, side: str, name: str, available: torch.Tensor, k: int) -> None:
        kind = self.harm_set() if side == "harm" else self.benign_set()
        scores = self.scores.get(kind) if kind else None
        if isinstance(scores, store.TailScores) and scores.short_rows(name, available, k):
            raise scores.too_short(f"pruning per row ({side} side)", k, name)
        if side == "harm" and self._positives_only_stored() and bool((available < k).any()):
            raise self._signs_error(f"{k} per row", name)


def select(
    spec: PruneSpec,
    params: Mapping[str, ScoredParam],
    weights: Mapping[str, torch.Tensor],
    scores: Mapping[str, Mapping[str, torch.Tensor]],
    device: torch.device | str | None = None,
    head_dim: int | None = None,
) -> dict[str, torch.Tensor]:
    """Flat indices (sorted int64, on the host) of the weights to prune, per parameter name.

    ``device``: where the matrices are ranked (default: where the scores are); the pipeline passes the GPU.
    ``head_dim``: the attention head size, read by granularity=head only.
    pruning.layers: the other layers' matrices get empty masks and are no part of a global ranking.
    """
    spec.validate()
    spec.check_layers(p.layer for p in params.values())
    if spec.freeze_first_top_q:
        return _select_band(spec, params, weights, scores, device)
    targets = {n: p for n, p in params.items() if spec.prunes_layer(p.layer)}
    chosen = _select(spec, targets, weights, scores, device, head_dim) if targets else {}
    return {n: chosen.get(n, torch.zeros(0, dtype=torch.long)) for n in params}


def _select(
    spec: PruneSpec,
    params: Mapping[str, ScoredParam],
    weights: Mapping[str, torch.Tensor],
    scores: Mapping[str, Mapping[str, torch.Tensor]],
    device: torch.device | str | None,
    head_dim: int | None,
) -> dict[str, torch.Tensor]:
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
    by_unit = _select_tails if views.reads_tails() else _select_unit
    out: dict[str, torch.Tensor] = {}
    if spec.granularity == "global":
        return by_unit(spec, views, names, sum(weights[n].numel() for n in names))
    for n in names:  # a matrix counts from its shape: int(f * cols * rows) with pruning.counts=floor
        out.update(by_unit(spec, views, [n], tuple(weights[n].shape)))
    return out


def _select_band(
    spec: PruneSpec,
    params: Mapping[str, ScoredParam],
    weights: Mapping[str, torch.Tensor],
    scores: Mapping[str, Mapping[str, torch.Tensor]],
    device: torch.device | str | None,
) -> dict[str, torch.Tensor]:
    """pruning.freeze_first_top_q: TopK_2q(H) minus TopK_p(U), minus TopK_q(H): the next band of harm weights
    (two top-k's, as the authors' code takes them: with ties=topk each falls as torch.topk breaks its ties)."""
    assert spec.harm_fraction is not None
    wide = replace(spec, harm_fraction=2 * spec.harm_fraction, freeze_first_top_q=False)
    first = replace(spec, protect=0.0, freeze_first_top_q=False)
    band, top = select(wide, params, weights, scores, device), select(first, params, weights, scores, device)
    return {n: band[n][~torch.isin(band[n], top[n])] for n in params}


def _select_unit(spec: PruneSpec, views: _Scores, unit: list[str], size: Size) -> dict[str, torch.Tensor]:
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

    def harm_keys(n: str) -> torch.Tensor:
        h = views.harm(n)
        keys = float_keys(h).masked_fill_(h == float("-inf"), EXCLUDED)
        if fractions or not spec.protects:  # nothing protected: no mask at all (a host-side one breaks a GPU)
            return keys
        return keys.masked_fill_(protected.mask(n, benign_keys(n)), EXCLUDED)

    k = count(spec, spec.harm_fraction if fractions else spec.sparsity, size)
    chosen = top_k_threshold(unit, harm_keys, k)
    if spec.rule in SCORE_RULES:
        views.check("harm", unit, chosen.available, k)
    out = {}
    for n in unit:
        mask = chosen.mask(n, harm_keys(n))
        if fractions and spec.protects:
            mask &= ~protected.mask(n, benign_keys(n))
        out[n] = torch.nonzero(mask.view(-1)).view(-1).cpu()
    return out


def _select_tails(spec: PruneSpec, views: _Scores, unit: list[str], size: Size) -> dict[str, torch.Tensor]:
    """``_select_unit`` over the stored tails of compact sets only: a top-k over K-sized (index, value) pairs
    instead of N-sized streams. The tails are prefixes of the ranking in pruning's tie order, so the mask is
    the dense set's exactly. Counts are checked after the device work, with one host sync."""
    if not unit:
        return {}
    fractions = spec.harm_fraction is not None
    protected: dict[str, torch.Tensor] = {}  # per matrix: protected flat indices, -1 where a tail entry is not
    checks: list[tuple[str, torch.Tensor, int]] = []
    if spec.protects:
        k_protect = count(spec, spec.protect, size)
        idx_u, keys_u = zip(*(views.benign_tail(n) for n in unit), strict=True)
        picked, available = top_k_of_tails(keys_u, k_protect)
        protected = {n: torch.where(p, i, -1) for n, i, p in zip(unit, idx_u, picked, strict=True)}
        checks.append(("benign", available, k_protect))
    idx_h, keys_h = [], []
    for n in unit:
        idx, keys = views.harm_tail(n)
        if spec.protects and not fractions:
            keys = keys.masked_fill_(torch.isin(idx, protected[n]), EXCLUDED)
        idx_h.append(idx)
        keys_h.append(keys)
    k = count(spec, spec.harm_fraction if fractions else spec.sparsity, size)
    chosen, available = top_k_of_tails(keys_h, k)
    checks.append(("harm", available, k))
    for (side, _, wanted), found in zip(checks, torch.stack([c[1] for c in checks]).tolist(), strict=True):
        views.check(side, unit, int(found), wanted)
    out = {}
    for n, idx, mask in zip(unit, idx_h, chosen, strict=True):
        if fractions and spec.protects:
            mask &= ~torch.isin(idx, protected[n])
        out[n] = idx[mask].cpu()  # tails are read in flat-index order: already sorted
    return out


def _select_topk(spec: PruneSpec, views: _Scores, name: str) -> torch.Tensor:
    """Wei et al.'s set difference as their code runs it: ``torch.topk`` of each flattened ranking, then
    ``isin``, so ties at a threshold fall the way torch.topk breaks them (with pruning.counts=floor: their counts)."""

    def top(values: torch.Tensor, k: int) -> torch.Tensor:
        idx = torch.topk(values, min(k, values.numel())).indices
        return idx[values[idx] > float("-inf")]  # entries a compact set does not hold, or not eligible

    harm = views.harm(name).view(-1)
    size = tuple(views.weights[name].shape)  # int(f * cols * rows), as the authors count
    fractions = spec.harm_fraction is not None
    protected = torch.zeros(0, dtype=torch.long, device=harm.device)
    checks: list[tuple[str, torch.Tensor, int]] = []  # counts checked at the end: one host sync, after the work
    if spec.protects:
        k_protect = count(spec, spec.protect, size)
        benign = views.benign(name).view(-1)
        checks.append(("benign", (benign > float("-inf")).sum(), k_protect))
        protected = top(benign, k_protect)
    k = count(spec, spec.harm_fraction if fractions else spec.sparsity, size)
    if not fractions:
        harm = harm.clone()
        harm[protected] = float("-inf")
    if spec.rule in SCORE_RULES:
        checks.append(("harm", (harm > float("-inf")).sum(), k))
    chosen = top(harm, k)
    if fractions:
        chosen = chosen[~torch.isin(chosen, protected)]
    chosen = torch.sort(chosen).values
    if checks:
        for (side, _, wanted), found in zip(checks, torch.stack([c[1] for c in checks]).tolist(), strict=True):
            views.check(side, [name], int(found), wanted)
    return chosen.cpu()


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
