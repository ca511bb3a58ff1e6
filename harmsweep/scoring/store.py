"""Score sets on disk: compact (the top tail each reader ranks, plus exact summaries) or dense (every score).

Only two readers use scores, and both read the top of one ranking: mask selection (the largest H = -S
of the harm set, the largest U of the benign set) and the report's compression metrics (the top-k of
H and of |S_benign|, the sum of positive H, the Gini). A compact set keeps, per ranking unit (all
matrices, one matrix or one row: ``pruning.granularity``), the exact top ``keep`` fraction of the
ranking its kind is read by, as (flat index, raw S) pairs, and the summaries computed from the full
set while it is still in memory. At 8B and the defaults that is 1.7 GB per variant instead of 56 GB.
Writing (``scoring.writer``) summarises where the buffers live.

The stored tail is a prefix of the ranking in pruning's order (value, then matrix order, then flat
index), so any top-k that fits inside it is the dense set's top-k exactly; ``short`` tells a reader
when a request reaches past the tail, so it stops instead of answering wrongly.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from harmsweep.errors import HarmsweepError
from harmsweep.scoring.spec import StoreSpec
from harmsweep.scoring.topk import ranking

UNITS = ("global", "matrix", "row")
ORDERS = ("neg", "pos", "abs")  # rank by -S (harm H, signed benign), S (unsigned scores), |S| (abs_signed benign)
INDEX_BYTES, VALUE_BYTES = 4, 4  # int32 flat index (every matrix up to 70B is < 2^31 entries), fp32 raw S
_NEG_INF = float("-inf")


@dataclass(frozen=True)
class Layout:
    """What one stored set holds: its kind, and for a compact set the ranking, unit and fraction kept."""

    spec: StoreSpec
    kind: str
    order: str = "neg"
    unit: str = "global"

    @classmethod
    def read_by(cls, spec: StoreSpec, kind: str, benign_importance: str, granularity: str) -> Layout:
        """The layout of a set of ``kind`` as a pruning run with these settings reads it."""
        return cls(spec, kind, order_of(kind, benign_importance), granularity)

    def key(self) -> dict[str, Any]:
        """The part of the cache key that tells stored sets apart (a dense set serves every ranking and unit).

        Not the fraction kept: a set keeping more serves every run that needs less (``serves``)."""
        if self.spec.store == "dense":
            return {"format": "dense"}
        return {"format": "compact", "order": self.order, "unit": self.unit}

    def serves(self, scores: Mapping[str, torch.Tensor] | TailScores) -> bool:
        """Whether a stored set answers every top-k a reader of this layout asks: it keeps at least this
        layout's fraction, or it is complete (no unit had more eligible entries than its tail holds)."""
        if not isinstance(scores, TailScores):
            return True
        if scores.keep >= self.spec.fraction(self.kind):
            return True
        return scores.unit != "row" and not any(scores.truncated.values())


def order_of(kind: str, benign_importance: str = "abs_signed") -> str:
    """The ranking a score set of ``kind`` is read by (pruning/select.py's views)."""
    if kind.endswith(("unsigned", "wanda")):  # scores without a sign: bigger is more important
        return "pos"
    if kind == "harm":
        return "neg"
    return "abs" if benign_importance == "abs_signed" else "neg"


def eligible(values: torch.Tensor, kind: str) -> torch.Tensor:
    """Entries a reader may rank: finite ranking values, and for the harm set only H > 0."""
    return values > 0 if kind == "harm" else values > _NEG_INF


@dataclass(frozen=True)
class ScoreStats:
    """Exact summaries of the full set, computed while it is in memory (the Gini needs every positive H)."""

    n: int  # scored weights with a (non-NaN) score
    harm_positive_sum: float | None = None  # sum of max(H, 0), float64: the share denominator of metric B
    gini: float | None = None  # Gini of max(H, 0) over the n weights


def ranked(scores: Mapping[str, torch.Tensor] | TailScores, name: str, order: str, device: Any = None) -> torch.Tensor:
    """One matrix's ranking values from a dense mapping or a compact set (-inf where nothing is stored)."""
    if isinstance(scores, TailScores):
        return scores.ranked(name, order, device)
    s = scores[name]
    return ranking(s.to(device, non_blocking=True) if device is not None else s, order)


def stats_of(scores: Mapping[str, torch.Tensor] | TailScores) -> ScoreStats | None:
    return getattr(scores, "stats", None)


def short(scores: Mapping[str, torch.Tensor] | TailScores, unit: str, available: int, k: int) -> bool:
    """Whether a top-k over ``unit`` that found ``available`` eligible entries reached past a stored tail."""
    return isinstance(scores, TailScores) and scores.short(unit, available, k)


# ---------------------------------------------------------------- reading


class DenseScores(Mapping[str, torch.Tensor]):
    """A dense score file read one matrix at a time: selection streams matrices, so at 8B the host holds
    one matrix (a few hundred MB) instead of the whole 28 GB set."""

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        self.path = Path(path)
        self._file = safe_open(str(self.path), framework="pt", device=device)
        meta = self._file.metadata() or {}
        self._names = json.loads(meta["names"]) if "names" in meta else list(self._file.keys())
        self.stats = ScoreStats(**json.loads(meta["stats"])) if "stats" in meta else None

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._file.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class TailScores:
    """A compact score set: the stored top tail of one ranking, per unit, and the full set's summaries."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = safe_open(str(self.path), framework="pt", device="cpu")
        meta = self._file.metadata()
        self.kind, self.order, self.unit, self.setting = meta["kind"], meta["order"], meta["unit"], meta["setting"]
        self.keep = float(meta["keep"])
        self.shapes = {n: torch.Size(s) for n, s in json.loads(meta["shapes"]).items()}
        self._names = json.loads(meta["names"])
        self.truncated: dict[str, bool] = json.loads(meta["truncated"])
        self.k: dict[str, int] = json.loads(meta["k"])
        self.stats = ScoreStats(**json.loads(meta["stats"]))

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self.shapes

    def stored(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat indices (int64) and raw S of the entries kept for ``name``."""
        return self._file.get_tensor(f"{name}/index").long(), self._file.get_tensor(f"{name}/value")

    def ranked(self, name: str, order: str, device: Any = None) -> torch.Tensor:
        """The dense matrix of ranking values, -inf where nothing is stored (rankings the tails cannot serve)."""
        self._check_order(order)
        idx, value = self.stored(name)
        out = torch.full(self.shapes[name], _NEG_INF, device=device)
        out.view(-1)[idx.to(out.device)] = ranking(value.to(out.device), order)
        return out

    def tail(self, name: str, order: str, device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat indices (int64, ascending) and ranking values of the stored entries only, on ``device``:
        all a top-k inside the tail reads, K entries instead of the matrix's N."""
        self._check_order(order)
        idx, value = self.stored(name)
        if device is not None:
            idx, value = idx.to(device, non_blocking=True), value.to(device, non_blocking=True)
        idx, perm = torch.sort(idx)  # flat-index order: ties in pruning's order whatever order the writer used
        return idx, ranking(value[perm], order)

    def _check_order(self, order: str) -> None:
        if order != self.order:
            raise HarmsweepError(
                f"{self.path} keeps the top of {_ORDER_NAMES[self.order]}, but this reader ranks by "
                f"{_ORDER_NAMES[order]}: use a run with the same pruning.benign_importance, or scores.store=dense"
            )

    def require_unit(self, unit: str) -> None:
        if unit != self.unit:
            raise HarmsweepError(
                f"{self.path} keeps score tails per {self.unit} unit, not per {unit}: a top-k per {unit} needs its "
                f"own set (a run with pruning.granularity={unit} scores one) or scores.store=dense"
            )

    def short(self, unit: str, available: int, k: int) -> bool:
        return available < k and bool(self.truncated.get("*" if self.unit == "global" else unit, False))

    def short_rows(self, name: str, available: torch.Tensor, k: int) -> bool:
        cut = self._file.get_tensor(f"{name}/truncated_rows").bool().to(available.device)
        return bool((cut & (available < k)).any())

    def too_short(self, what: str, k: int, unit: str) -> HarmsweepError:
        """A top-k reached past the tail: the tail's entries that the reader may not take (protected weights,
        H <= 0) are skipped, so a tail longer than k can still leave fewer than k; say so, and what to change."""
        held = self.k.get("*" if self.unit == "global" else unit, "?")
        return HarmsweepError(
            f"{what} needs {k:,} eligible entries of unit {unit}, and the stored tail of {self.path.parent.name} "
            f"(the top {held if isinstance(held, str) else f'{held:,}'} of the ranking, scores.{self.setting}="
            f"{self.keep:g}) has fewer left once the entries it may not take (protected weights, H <= 0) are "
            f"skipped: use scores.{self.setting}=auto (sized from the run), raise it, or use scores.store=dense"
        )


_ORDER_NAMES = {"neg": "-S", "pos": "S", "abs": "|S|"}
ScoreSet = DenseScores | TailScores


def open_scores(path: str | Path) -> DenseScores | TailScores:
    """The score set at ``path``, in whichever format it was written."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
    return TailScores(path) if meta.get("harmsweep_format") == "compact" else DenseScores(path)


def compact_bytes(n: int, keep: float) -> int:
    """Bytes of one compact set of ``n`` scores keeping ``keep`` of them (headers aside)."""
    return round(keep * n) * (INDEX_BYTES + VALUE_BYTES)


def stored_bytes(kept: StoreSpec, kind: str, n: int) -> int:
    """Bytes one set of ``kind`` over ``n`` scored weights takes on disk (and a cached run reads)."""
    return n * VALUE_BYTES if kept.store == "dense" else compact_bytes(n, kept.fraction(kind))
