"""Structured selections: N of every M weights along a row (N:M sparsity), and whole attention heads.

Both rank the same per-weight values as the unstructured rules (pruning._Scores: H = -S, an unsigned or
Wanda score, -|W|, a draw), so every rule and criterion works with them; only the unit changes.
A head is its query rows and its output-projection columns: zeroing the o_proj columns removes the
head's contribution exactly, and its score is the sum over those weights (for signed SNIP, -sum S is
the first-order loss change of removing the head). Key/value heads are shared by several query heads
under grouped-query attention, so they are left alone.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from harmsweep.errors import HarmsweepError
from harmsweep.pruning.spec import PruneSpec, count

if TYPE_CHECKING:
    from harmsweep.models.parts import ScoredParam

_NEG_INF = float("-inf")
log = logging.getLogger(__name__)


def select_nm(spec: PruneSpec, views: Any, name: str, rows_dim: int) -> torch.Tensor:
    """Exactly ``nm_n`` of every group of ``nm_m`` consecutive inputs of an output row: the pattern a sparse kernel
    (2:4 on GPUs) can use. The ranking chooses which, never how many: in each group the eligible weights go first
    (by rank, ties by position), then the ineligible ones (H <= 0 under signed SNIP, by position), then the
    protected ones (top ``protect`` of the matrix by benign importance, least important first). So a protected
    weight is pruned only in a group with fewer than ``nm_n`` unprotected weights; how many were is logged."""

    def rows(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(0, 1) if rows_dim == 1 else t

    harm = rows(views.harm(name)).contiguous()
    n_rows, width = harm.shape
    n, m = spec.nm_n, spec.nm_m
    if width % m:
        raise HarmsweepError(f"pruning.granularity=nm: {name} has rows of {width} inputs, not a multiple of nm_m={m}")
    tier = (harm == _NEG_INF).to(torch.int8)  # 0 eligible, 1 not eligible, 2 protected
    if spec.protects:
        benign = rows(views.benign(name)).reshape(-1)
        k_protect = count(spec, spec.protect, tuple(views.weights[name].shape))  # a matrix: the authors' count
        order = torch.sort(benign, descending=True, stable=True).indices[:k_protect]
        order = order[benign[order] > _NEG_INF]
        tier.view(-1)[order] = 2
        harm.view(-1)[order] = -benign[order].to(harm.dtype)  # among the protected: the least important first
    groups, tiers = harm.view(n_rows, width // m, m), tier.view(n_rows, width // m, m)
    by_rank = torch.sort(groups, dim=2, descending=True, stable=True).indices
    by_tier = torch.sort(torch.gather(tiers, 2, by_rank), dim=2, stable=True).indices  # stable: rank within a tier
    idx = torch.gather(by_rank, 2, by_tier)[..., :n]
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, idx, True)
    forced = int((torch.gather(tiers, 2, idx) == 2).sum())
    if forced:
        log.info("%s: %d protected weights pruned, in groups of %d holding fewer than %d others", name, forced, m, n)
    return torch.nonzero(rows(mask.view(n_rows, width)).reshape(-1)).view(-1).cpu()


def head_slices(params: Mapping[str, ScoredParam], head_dim: int | None) -> list[tuple[str, str, int]]:
    """Per layer, the (q_proj, o_proj) names and the head count: the units of granularity=head."""
    if not head_dim:
        raise HarmsweepError("pruning.granularity=head needs the model's head size (config head_dim)")
    by_layer: dict[int, dict[str, str]] = {}
    for name, p in params.items():
        if p.module_type in ("q_proj", "o_proj") and p.rows_dim == 0:
            by_layer.setdefault(p.layer, {})[p.module_type] = name
    if not by_layer or any(len(v) < 2 for v in by_layer.values()):
        raise HarmsweepError(
            "pruning.granularity=head supports attention with separate q_proj and o_proj linear layers "
            "(Llama, Qwen2, Gemma, OLMo); this model has none"
        )
    return [(v["q_proj"], v["o_proj"], layer) for layer, v in sorted(by_layer.items())]


def _head_values(per_weight: Any, q: str, o: str, head_dim: int) -> torch.Tensor:
    """Sum of a per-weight ranking over each head's query rows and output columns."""
    q_vals, o_vals = per_weight(q), per_weight(o)
    heads = q_vals.size(0) // head_dim
    q_sum = q_vals.double().reshape(heads, head_dim, -1).sum((1, 2))
    o_sum = o_vals.double().reshape(o_vals.size(0), heads, head_dim).sum((0, 2))
    return q_sum + o_sum


def select_heads(
    spec: PruneSpec,
    views: Any,
    params: Mapping[str, ScoredParam],
    weights: Mapping[str, torch.Tensor],
    head_dim: int | None,
) -> dict[str, torch.Tensor]:
    """K = count(sparsity, heads) whole heads over the model (or TopK_q minus TopK_p with harm_fraction),
    ranked by their summed score; protected heads are the top ``protect`` fraction by summed benign importance."""
    units = head_slices(params, head_dim)
    assert head_dim is not None
    harm = torch.cat([_head_values(views.raw_harm, q, o, head_dim) for q, o, _ in units])
    if spec.order == "bottom":
        harm = torch.where(torch.isfinite(harm), -harm, _NEG_INF)
    elif spec.harm_set() == "harm" and spec.eligible == "positive":
        harm = harm.masked_fill(~(harm > 0), _NEG_INF)  # heads whose removal raises the harmful loss
    total = harm.numel()
    protected = torch.zeros(total, dtype=torch.bool, device=harm.device)  # the rankings' device, not the host
    if spec.protects:
        benign = torch.cat([_head_values(views.benign, q, o, head_dim) for q, o, _ in units])
        order = torch.sort(benign, descending=True, stable=True).indices[: count(spec, spec.protect, total)]
        protected[order] = True
    fractions = spec.harm_fraction is not None
    k = count(spec, spec.harm_fraction if fractions else spec.sparsity, total)
    ranked = harm if fractions else harm.masked_fill(protected, _NEG_INF)
    top = torch.sort(ranked, descending=True, stable=True).indices[:k]
    chosen = torch.zeros(total, dtype=torch.bool, device=harm.device)
    chosen[top] = ranked[top] > _NEG_INF
    if fractions:
        chosen &= ~protected
    chosen = chosen.cpu()  # one copy of a few hundred flags: the masks below are built and returned on the host
    out = {n: torch.zeros(0, dtype=torch.long) for n in params}
    start = 0
    for q, o, _ in units:
        heads = weights[q].size(0) // head_dim
        picked = torch.nonzero(chosen[start : start + heads]).view(-1)
        start += heads
        out[q] = _flat(weights[q].shape, picked, head_dim, rows=True)
        out[o] = _flat(weights[o].shape, picked, head_dim, rows=False)
    return out


def _flat(shape: torch.Size, heads: torch.Tensor, head_dim: int, rows: bool) -> torch.Tensor:
    """Flat indices of the given heads' rows (q_proj) or columns (o_proj) of a matrix."""
    mask = torch.zeros(shape, dtype=torch.bool)
    for h in heads.tolist():
        if rows:
            mask[h * head_dim : (h + 1) * head_dim] = True
        else:
            mask[:, h * head_dim : (h + 1) * head_dim] = True
    return torch.nonzero(mask.view(-1)).view(-1)
