"""Summaries of a full score set that its stored tail cannot give: the Gini of the harm scores.

Computed while the whole set is in memory (scoring.store writes it into the set's header), so the report
reads compression metrics from a compact set as exactly as from a dense one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from harmsweep.scoring.topk import _BINS, float_keys, ranking

_GINI_CHUNK = 1 << 22  # values per float64 chunk in gini(): 32 MB of temporaries


def gini(scores: Mapping[str, torch.Tensor], budget: int | None = None) -> float:
    """Gini coefficient of max(H, 0), H = -S, over all scored weights of a dense set: 0 = even, -> 1 = held by few.

    Exact: G = 2 * sum_i i * x_(i) / (n * sum x) - (n + 1) / n, x ascending, i from 1, n = number of (non-NaN)
    scores. The n - P zeros sort first, so only the P positive values are ranked: sum_i i * x_(i) =
    (n - P) * sum x + sum_j j * p_(j). They are ranked in value ranges of at most ``budget`` values (default
    max(2^26, P / 8)), found from a histogram of their top 16 bits: one sorted float32 buffer of one range at a
    time (1.7 GB at 8B), and a pass over the set per range. NaN for an empty or all-zero set.
    """
    n = positives = 0
    high = torch.zeros(_BINS, dtype=torch.int64)
    for name in scores:
        h = ranking(scores[name], "neg")
        n += int((~torch.isnan(scores[name])).sum())
        positive = h[h > 0]
        positives += positive.numel()
        high += torch.bincount((float_keys(positive) >> 16).view(-1), minlength=_BINS).cpu()
    if n == 0 or positives == 0:
        return math.nan
    budget = budget or max(1 << 26, positives // 8)
    total = weighted = 0.0
    rank = 0
    for lo, hi in _ranges(high, budget):
        parts = []
        for name in scores:
            h = ranking(scores[name], "neg")
            bins = float_keys(h) >> 16
            parts.append(h[(h > 0) & (bins >= lo) & (bins < hi)])
        chunk_values = torch.cat([t.cpu() for t in parts]).numpy()  # scores may sit on a GPU (scoring.offload=false)
        chunk_values.sort()  # in place
        for start in range(0, chunk_values.size, _GINI_CHUNK):
            chunk = torch.from_numpy(chunk_values[start : start + _GINI_CHUNK]).double()
            ranks = torch.arange(rank + 1, rank + 1 + chunk.numel(), dtype=torch.float64)
            total += float(chunk.sum())
            weighted += float((ranks * chunk).sum())
            rank += chunk.numel()
    weighted += (n - positives) * total
    return 2 * weighted / (n * total) - (n + 1) / n


def _ranges(hist: torch.Tensor, budget: int) -> list[tuple[int, int]]:
    """Consecutive [lo, hi) bin ranges, ascending, each holding at most ``budget`` values (or one bin)."""
    out, lo, count = [], None, 0
    for b in torch.nonzero(hist).view(-1).tolist():
        c = int(hist[b])
        if lo is not None and count + c > budget:
            out.append((lo, b))
            lo, count = None, 0
        if lo is None:
            lo = b
        count += c
    if lo is not None:
        out.append((lo, _BINS))
    return out
