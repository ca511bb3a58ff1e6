"""Category-by-category matrices: how pruning for one harm category transfers, and how masks overlap.

The paper's transfer figure asks whether the weights found on category c also carry harm on c'
(rows = where the mask came from, columns = where harm is measured). Its overlap figure asks whether
the masks themselves coincide, which only means something against chance: two independent random
sets of K out of N share K/N of their weights, so the matrices carry that baseline with them.
Masks are flat indices per parameter name; intersections are computed per name on sorted int64
tensors, never on Python sets of (name, index) tuples, since a mask can hold millions of weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

TRANSFER_KINDS = ("relative_reduction", "delta")
_TRANSFER_NOTES = {
    "relative_reduction": (
        "value = 1 - after/before: the fraction of the unpruned model's harm on the column category removed by "
        "pruning the weights found on the row category (1 = all removed, 0 = none, negative = harm went up); "
        "None where the unpruned measure is missing or 0, or the pruned one is missing"
    ),
    "delta": (
        "value = after - before: change of the measure on the column category after pruning the weights found on "
        "the row category (for NLL of harmful targets, positive means harm went down); None where either is missing"
    ),
}


@dataclass(frozen=True)
class Matrix:
    """A labelled rows x cols table of optional floats, with what it measures and its chance level."""

    rows: list[str]
    cols: list[str]
    values: list[list[float | None]]
    kind: str
    note: str = ""
    chance: float | None = None

    def to_json(self) -> dict:
        """Plain dict (lists, floats, None) so it can go straight into json.dump and back."""
        return {
            "rows": list(self.rows),
            "cols": list(self.cols),
            "values": [list(r) for r in self.values],
            "kind": self.kind,
            "note": self.note,
            "chance": self.chance,
        }

    @classmethod
    def from_json(cls, d: Mapping) -> Matrix:
        """Inverse of to_json; note and chance may be absent."""
        return cls(
            rows=[str(r) for r in d["rows"]],
            cols=[str(c) for c in d["cols"]],
            values=[[None if v is None else float(v) for v in row] for row in d["values"]],
            kind=str(d["kind"]),
            note=str(d.get("note", "")),
            chance=None if d.get("chance") is None else float(d["chance"]),
        )

    def cell(self, row: str, col: str) -> float | None:
        """The value at (row, col) by label, so callers need not track positions."""
        return self.values[self.rows.index(row)][self.cols.index(col)]


def _missing(x: float | None) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def transfer_matrix(
    before: Mapping[str, float | None],
    after: Mapping[str, Mapping[str, float | None]],
    kind: str,
) -> Matrix:
    """Harm on each target category after pruning by each source category, relative to the unpruned model.

    before[target] is the unpruned measure; after[source][target] the measure after pruning the weights
    found on source. Rows follow the order of `after`, columns the order of `before`; a target absent
    from after[source] gives None.
    """
    if kind not in TRANSFER_KINDS:
        raise ValueError(f"unknown transfer matrix kind {kind!r}; expected one of {', '.join(TRANSFER_KINDS)}")
    rows = list(after)
    cols = list(before)
    values: list[list[float | None]] = []
    for source in rows:
        row: list[float | None] = []
        for target in cols:
            b = before[target]
            a = after[source].get(target)
            if _missing(a) or _missing(b):
                row.append(None)
            elif kind == "relative_reduction":
                row.append(None if b == 0 else 1.0 - float(a) / float(b))
            else:
                row.append(float(a) - float(b))
        values.append(row)
    return Matrix(rows=rows, cols=cols, values=values, kind=kind, note=_TRANSFER_NOTES[kind])


def mask_size(mask: Mapping[str, torch.Tensor]) -> int:
    """Number of distinct pruned weights in a mask (duplicated indices count once)."""
    return sum(int(torch.unique(idx.reshape(-1)).numel()) for idx in mask.values())


def chance_overlap(k: float, n: int) -> float:
    """Expected |A ∩ B| / |A| for two independent uniform random K-subsets of N weights: K/N."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    return float(k) / float(n)


def chance_jaccard(k: float, n: int) -> float:
    """Jaccard at chance: E|A∩B| = K²/N, so K²/N / (2K - K²/N) = K/(2N - K)."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    denom = 2.0 * n - float(k)
    return float(k) / denom if denom > 0 else 0.0


def _canonical(mask: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sorted, deduplicated int64 CPU indices per parameter, empty parameters dropped."""
    out: dict[str, torch.Tensor] = {}
    for name, idx in mask.items():
        flat = torch.unique(idx.detach().reshape(-1).to(device="cpu", dtype=torch.int64))  # sorted
        if flat.numel():
            out[name] = flat
    return out


def _intersection(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> int:
    total = 0
    for name, ia in a.items():
        ib = b.get(name)
        if ib is None:
            continue
        small, large = (ia, ib) if ia.numel() <= ib.numel() else (ib, ia)
        total += int(torch.isin(small, large, assume_unique=True).sum())
    return total


def overlap_matrix(masks: Mapping[str, Mapping[str, torch.Tensor]], n_total: int) -> tuple[Matrix, Matrix]:
    """(intersection, Jaccard) matrices over every ordered pair of named masks.

    Intersection[a][b] = |P_a ∩ P_b| / |P_a| (asymmetric when sizes differ; None if P_a is empty);
    Jaccard[a][b] = |P_a ∩ P_b| / |P_a ∪ P_b| (None if both are empty). A weight is identified by
    (parameter name, flat index). Chance levels use K = the mean mask size over the given masks.
    """
    names = list(masks)
    canon = {n: _canonical(masks[n]) for n in names}
    sizes = {n: sum(int(t.numel()) for t in canon[n].values()) for n in names}
    inter_vals: list[list[float | None]] = []
    jac_vals: list[list[float | None]] = []
    cache: dict[tuple[str, str], int] = {}
    for a in names:
        irow: list[float | None] = []
        jrow: list[float | None] = []
        for b in names:
            key = (a, b) if names.index(a) <= names.index(b) else (b, a)
            if key not in cache:
                cache[key] = sizes[a] if a == b else _intersection(canon[a], canon[b])
            both = cache[key]
            union = sizes[a] + sizes[b] - both
            irow.append(both / sizes[a] if sizes[a] else None)
            jrow.append(both / union if union else None)
        inter_vals.append(irow)
        jac_vals.append(jrow)
    k = sum(sizes.values()) / len(names) if names else 0.0
    inter = Matrix(
        rows=list(names),
        cols=list(names),
        values=inter_vals,
        kind="intersection",
        note=(
            "value = |P_row ∩ P_col| / |P_row|: share of the row mask's weights also in the column mask "
            "(weights identified by parameter name and flat index; None if the row mask is empty). "
            f"chance = K/N with K = mean mask size ({k:g}) and N = {n_total}: what two independent random "
            "sets of size K would share as a fraction of K"
        ),
        chance=chance_overlap(k, n_total),
    )
    jac = Matrix(
        rows=list(names),
        cols=list(names),
        values=jac_vals,
        kind="jaccard",
        note=(
            "value = |P_row ∩ P_col| / |P_row ∪ P_col| (None if both masks are empty). "
            f"chance = K/(2N - K) with K = mean mask size ({k:g}) and N = {n_total}: the Jaccard index of two "
            "independent random sets of size K"
        ),
        chance=chance_jaccard(k, n_total),
    )
    return inter, jac
