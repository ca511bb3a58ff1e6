"""Seeded, prompt-disjoint subsets of a dataset.

Calibration (scoring weights) and evaluation must never see the same prompt, or a pruning method could look good by
memorising its calibration prompts. Splits work on unique prompt texts, so records that share a prompt (pair datasets
with several responses per prompt) always land on the same side, and they use a private `random.Random(seed)` so the
result depends on the seed alone, not on whatever else consumed the global random state.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import datasets

from harmsweep.data.records import Record
from harmsweep.errors import DataError


def _shuffled_groups(prompts: Sequence[str], seed: int) -> list[list[int]]:
    """Group row indices by prompt (groups in first-seen order, rows in input order), then shuffle the groups."""
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    ordered = list(groups.values())
    random.Random(seed).shuffle(ordered)
    return ordered


def _check_count(name: str, n: int) -> None:
    """Counts come from configs, so a bad one is a user error, not a bug."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise DataError(f"{name} must be a whole number >= 0, got {n!r}")


def split_indices(prompts: Sequence[str], n_first: int, n_second: int | None, seed: int) -> tuple[list[int], list[int]]:
    """Row indices of (first, second): exactly n_first and n_second rows and no prompt text in common.

    ``n_second=None``: every row whose prompt is not in the first part (a whole held-out set).

    The prompt groups are shuffled with `seed`; the first part is filled from the front, the second from the groups
    after it. When a group only partly fits, its remaining rows are left out of both parts (never moved to the
    other side). With unique prompts this is simply shuffle, then slice.
    """
    _check_count("n_first", n_first)
    if n_second is None:
        first, _ = split_indices(prompts, n_first, 0, seed)
        taken = {prompts[i] for i in first}
        return first, [i for group in _shuffled_groups(prompts, seed) for i in group if prompts[i] not in taken]
    _check_count("n_second", n_second)
    if n_first + n_second > len(prompts):
        raise DataError(
            f"asked for {n_first} + {n_second} = {n_first + n_second} records but the dataset has only {len(prompts)}; "
            "lower the counts or use a larger dataset"
        )
    groups = iter(_shuffled_groups(prompts, seed))
    parts: list[list[int]] = []
    for wanted in (n_first, n_second):
        part: list[int] = []
        while len(part) < wanted:
            group = next(groups, None)
            if group is None:
                unique = len(set(prompts))
                raise DataError(
                    f"cannot split {len(prompts)} records ({unique} unique prompts) into {n_first} + {n_second} "
                    "without sharing a prompt; lower the counts"
                )
            part.extend(group[: wanted - len(part)])
        parts.append(part)
    first, second = parts
    shared = {prompts[i] for i in first} & {prompts[i] for i in second}
    if shared:  # a real check, not `assert`, so it survives python -O
        raise RuntimeError(f"split_disjoint bug: {len(shared)} prompt(s) on both sides")
    return first, second


def split_disjoint(
    records: Sequence[Record], n_first: int, n_second: int | None, seed: int
) -> tuple[list[Record], list[Record]]:
    """`split_indices` applied to Records: (first, second) with no prompt text in common."""
    first, second = split_indices([r.prompt for r in records], n_first, n_second, seed)
    return [records[i] for i in first], [records[i] for i in second]


def split_dataset(
    table: datasets.Dataset, n_first: int, n_second: int | None, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """`split_indices` applied to a Dataset with a "prompt" column; same rows as `split_disjoint` for the same seed."""
    first, second = split_indices(list(table["prompt"]), n_first, n_second, seed)
    return table.select(first), table.select(second)


def take(records: Sequence[Record], n: int, seed: int) -> list[Record]:
    """A seeded subset of n records; equal to the first part of `split_disjoint` with the same seed."""
    return split_disjoint(records, n, 0, seed)[0]
