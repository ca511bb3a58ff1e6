"""Seeded, prompt-disjoint subsets of a dataset.

Calibration (scoring weights) and evaluation must never see the same prompt, or a pruning method could look good by
memorising its calibration prompts. Splits work on unique prompt texts, so records that share a prompt (pair datasets
with several responses per prompt) always land on the same side, and they use a private `random.Random(seed)` so the
result depends on the seed alone, not on whatever else consumed the global random state.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from harmsweep.data.records import Record
from harmsweep.errors import DataError


def _shuffled_groups(records: Sequence[Record], seed: int) -> list[list[Record]]:
    """Group records by prompt (groups in first-seen order, records in input order), then shuffle the groups."""
    groups: dict[str, list[Record]] = {}
    for record in records:
        groups.setdefault(record.prompt, []).append(record)
    ordered = list(groups.values())
    random.Random(seed).shuffle(ordered)
    return ordered


def _check_count(name: str, n: int) -> None:
    """Counts come from configs, so a bad one is a user error, not a bug."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise DataError(f"{name} must be a whole number >= 0, got {n!r}")


def split_disjoint(
    records: Sequence[Record], n_first: int, n_second: int | None, seed: int
) -> tuple[list[Record], list[Record]]:
    """Return (first, second) with exactly n_first and n_second records and no prompt text in common.

    ``n_second=None``: every record whose prompt is not in the first part (a whole held-out set).

    The prompt groups are shuffled with `seed`; the first part is filled from the front, the second from the groups
    after it. When a group only partly fits, its remaining records are left out of both parts (never moved to the
    other side). With unique prompts this is simply shuffle, then slice.
    """
    _check_count("n_first", n_first)
    if n_second is None:
        first, _ = split_disjoint(records, n_first, 0, seed)
        taken = {r.prompt for r in first}
        return first, [r for group in _shuffled_groups(records, seed) for r in group if r.prompt not in taken]
    _check_count("n_second", n_second)
    if n_first + n_second > len(records):
        raise DataError(
            f"asked for {n_first} + {n_second} = {n_first + n_second} records but the dataset has only {len(records)}; "
            "lower the counts or use a larger dataset"
        )
    groups = iter(_shuffled_groups(records, seed))
    parts: list[list[Record]] = []
    for wanted in (n_first, n_second):
        part: list[Record] = []
        while len(part) < wanted:
            group = next(groups, None)
            if group is None:
                unique = len({r.prompt for r in records})
                raise DataError(
                    f"cannot split {len(records)} records ({unique} unique prompts) into {n_first} + {n_second} "
                    "without sharing a prompt; lower the counts"
                )
            part.extend(group[: wanted - len(part)])
        parts.append(part)
    first, second = parts
    shared = {r.prompt for r in first} & {r.prompt for r in second}
    if shared:  # a real check, not `assert`, so it survives python -O
        raise RuntimeError(f"split_disjoint bug: {len(shared)} prompt(s) on both sides")
    return first, second


def take(records: Sequence[Record], n: int, seed: int) -> list[Record]:
    """A seeded subset of n records; equal to the first part of `split_disjoint` with the same seed."""
    return split_disjoint(records, n, 0, seed)[0]
