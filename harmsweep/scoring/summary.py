"""Summaries of a full score set that its stored tail cannot give: the Gini of the harm scores.

Computed where the score buffers live (scoring.store writes it into the set's header before the buffers
leave the GPU), so the report reads compression metrics from a compact set as exactly as from a dense one.
Every step runs on the scores' own devices: histograms join on one device, one sorted value range at a
time sits on that device, and only per-chunk sums come back to the host, in one copy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from harmsweep.scoring.topk import _BINS, float_keys, ranking

_GINI_CHUNK = 1 << 22  # values per float64 chunk in gini(): 32 MB of temporaries
_DEVICE_BUDGET = 1 << 28  # values per range sorted off the CPU: ~4 GB of sort temporaries, whatever the set's size


def to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every move of a summary or a tail to the host goes through here: the first copy waits for the
    device once, the rest are ready (tests count these moves and stand in for them on ``meta``)."""
    return [t.cpu() for t in tensors]


def histogram(bins: torch.Tensor, keep: torch.Tensor, n: int = _BINS) -> torch.Tensor:
    """Counts of ``bins`` where ``keep``, on their device and without a host sync: entries not kept count
    into an extra bin that is dropped (boolean indexing would wait for the device, and is slow on the CPU)."""
    return torch.bincount(torch.where(keep, bins, n).view(-1), minlength=n + 1)[:n]


def positive_histogram(h: torch.Tensor) -> torch.Tensor:
    """Counts of the positive values of ``h`` by the top 16 bits of their float keys (bins 0 .. 2^15 - 1)."""
    return histogram(float_keys(h) >> 16, h > 0)


def scored(s: torch.Tensor) -> torch.Tensor:
    """How many entries of ``s`` have a score (not NaN), as a 0-dim tensor on its device (no sync)."""
    return s.numel() - torch.count_nonzero(torch.isnan(s))


def gini(scores: Mapping[str, torch.Tensor], budget: int | None = None) -> float:
    """Gini coefficient of max(H, 0), H = -S, over all scored weights of a dense set: 0 = even, -> 1 = held by few.

    Exact: G = 2 * sum_i i * x_(i) / (n * sum x) - (n + 1) / n, x ascending, i from 1, n = number of (non-NaN)
    scores. The n - P zeros sort first, so only the P positive values are ranked: sum_i i * x_(i) =
    (n - P) * sum x + sum_j j * p_(j). One pass counts n and a histogram of the positives' top 16 bits; they
    are then ranked in value ranges of at most ``budget`` values (``default_budget``), one sorted float32
    buffer of one range at a time, and a pass over the set per range. NaN for an empty or all-zero set.
    """
    names = list(scores)
    if not names:
        return math.nan
    counts, hist = [], None
    for name in names:
        counts.append(scored(scores[name]))
        part = positive_histogram(ranking(scores[name], "neg"))
        hist = part if hist is None else hist.add_(part.to(hist.device))
    assert hist is not None
    (host,) = to_host([torch.cat([hist, torch.stack([c.to(hist.device) for c in counts])])])  # the pass's one sync
    return gini_from(scores, int(host[_BINS:].sum()), host[:_BINS], budget)


def default_budget(positives: int, device: torch.device) -> int:
    """Values ranked at once: max(2^26, P / 8) (1.7 GB of float32 at 8B); off the CPU at most 2^28, so a
    range joined on one GPU stays bounded however large the set (a 70B set's P / 8 is 17 GB)."""
    budget = max(1 << 26, positives // 8)
    return budget if device.type == "cpu" else min(budget, _DEVICE_BUDGET)


def in_range(h: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """The positive values of ``h`` whose top 16 key bits lie in [lo, hi)."""
    bins = float_keys(h) >> 16
    return h[(h > 0) & (bins >= lo) & (bins < hi)]


def gini_from(
    scores: Mapping[str, torch.Tensor],
    n: int,
    hist: torch.Tensor,
    budget: int | None = None,
    gathered: Sequence[torch.Tensor] | None = None,
) -> float:
    """The Gini from the counting pass's results: ``n`` scored weights and the positives' histogram (host).

    ``gathered``: every positive H, per matrix in order, already collected by the caller's own pass
    (scoring.store does so when one range holds them all); it is used only then.
    """
    positives = int(hist.sum())
    if n == 0 or positives == 0:
        return math.nan
    device = next(iter(scores.values())).device
    spans = ranges(hist, budget or default_budget(positives, device))
    sums: list[torch.Tensor] = []
    rank = 0
    for lo, hi in spans:
        if gathered is not None and len(spans) == 1:
            parts = list(gathered)
        else:
            parts = [in_range(ranking(scores[name], "neg"), lo, hi) for name in scores]
        values = _ascending(torch.cat([t.to(device) for t in parts]))
        del parts
        for start in range(0, values.numel(), _GINI_CHUNK):
            chunk = values[start : start + _GINI_CHUNK].double()
            ranks = torch.arange(rank + 1, rank + 1 + chunk.numel(), dtype=torch.float64, device=device)
            sums.append(torch.stack([chunk.sum(), (ranks * chunk).sum()]))
            rank += chunk.numel()
        del values
    total = weighted = 0.0
    for chunk_sum, chunk_weighted in to_host([torch.stack(sums)])[0].tolist():  # one copy, summed in chunk order
        total += chunk_sum
        weighted += chunk_weighted
    weighted += (n - positives) * total
    return 2 * weighted / (n * total) - (n + 1) / n


def _ascending(values: torch.Tensor) -> torch.Tensor:
    """The values sorted ascending: numpy's in-place sort on the CPU (faster there, no index buffer),
    torch's on a device."""
    if values.device.type == "cpu":
        values.numpy().sort()
        return values
    return torch.sort(values).values


def ranges(hist: torch.Tensor, budget: int) -> list[tuple[int, int]]:
    """Consecutive [lo, hi) bin ranges, ascending, each holding at most ``budget`` values (or one bin)."""
    out, lo, count = [], None, 0
    for b, c in enumerate(hist.tolist()):
        if c == 0:
            continue
        if lo is not None and count + c > budget:
            out.append((lo, b))
            lo, count = None, 0
        if lo is None:
            lo = b
        count += c
    if lo is not None:
        out.append((lo, _BINS))
    return out
