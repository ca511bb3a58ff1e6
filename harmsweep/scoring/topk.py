"""Rankings of raw scores and their exact top-k, streamed over many matrices.

Global selection never sorts or copies all scores: it streams the matrices through a radix select on the
float bit patterns (two 65,536-bin histogram passes, plus a tie pass when needed) and keeps only a threshold,
so it scales to 7e9 scores with one matrix-sized temporary at a time. Pruning, the compact score store and
the report's compression metrics all rank through this module, so they agree on every tie.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

_BINS = 1 << 16
_HALF = 1 << 15  # shifts the signed high half of a key into a bin index
_TAKE_ALL = -1


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


def top_k_of_tails(keys: Sequence[torch.Tensor], k: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Exact top-k over the concatenated keys of several short tails, ties by tail order, then position.

    The order ``top_k_threshold`` gives a stream when tails are its matrices (in order) and each tail's
    entries are in flat-index order. Returns per tail which entries are chosen, and the number of eligible
    keys as a 0-dim tensor on the keys' device (no host sync here).
    """
    flat = torch.cat([t.reshape(-1) for t in keys])
    eligible = flat != EXCLUDED
    chosen = torch.zeros_like(eligible)
    if k > 0 and flat.numel():
        top = torch.sort(flat, descending=True, stable=True).indices[:k]
        chosen[top] = eligible[top]
    return list(chosen.split([t.numel() for t in keys])), eligible.sum()


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


def row_top(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the column indices of the k largest values, ties by column (a stable sort), and which are > -inf."""
    idx = torch.sort(x, dim=1, descending=True, stable=True).indices[:, :k]
    return idx, torch.gather(x, 1, idx) > float("-inf")


def ranking(s: torch.Tensor, order: str) -> torch.Tensor:
    """Ranking values of raw scores S (bigger first), float32, NaN mapped to -inf (never eligible)."""
    s = s.detach().float()
    out = -s if order == "neg" else s.abs() if order == "abs" else s.clone()
    return out.nan_to_num_(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
