"""Writing a score set: its summaries and its compact tails, computed where the scores live.

The buffers may sit on a GPU, or on several under a device map: every matrix is worked on its own
device and only histograms, thresholds and the picked (index, value) pairs move, so no GPU waits on a
host-side summary. The layout and reading side of the format live in ``scoring.store``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from harmsweep.artifacts import atomic_path
from harmsweep.errors import HarmsweepError
from harmsweep.scoring import summary
from harmsweep.scoring.spec import StoreSpec
from harmsweep.scoring.store import ScoreStats, eligible
from harmsweep.scoring.topk import _BINS, _HALF, EXCLUDED, _bucket_from_top, float_keys, ranking, row_top

_NEG_INF = float("-inf")


def write(
    scores: Mapping[str, torch.Tensor],
    path: str | Path,
    kind: str,
    spec: StoreSpec,
    unit: str = "global",
    order: str = "neg",
    rows_dims: Mapping[str, int] | None = None,
) -> None:
    """Write ``scores`` (raw S, on the host or on their devices) as ``spec.store`` says, atomically; summaries
    in the header.

    Everything is computed where each matrix lives (a device map spreads them: histograms join on the first
    matrix's device), before the buffers leave it: one counting pass gives N, the positive sum, the Gini's
    histogram and the tails' thresholds; a second gathers each tail and the Gini's values. Only results come
    to the host (a few histograms, the tails; a dense set one matrix at a time), so the GPU is not left idle
    while the host sorts, and host syncs happen per pass, not per matrix (a nonzero on the CPU aside).
    """
    names = list(scores)
    first = _first_pass(scores, kind, order, unit)
    stats = ScoreStats(first.n)
    gathered: list[torch.Tensor] | None = None
    if kind == "harm":
        budget = summary.default_budget(int(first.positive_hist.sum()), _home(scores))
        if len(summary.ranges(first.positive_hist, budget)) == 1:  # one range: its values come with the tails' pass
            gathered = []
    meta = {"harmsweep_format": spec.store, "kind": kind, "names": json.dumps(names)}
    if spec.store == "dense":
        if gathered is not None:
            gathered = [_positives(ranking(scores[n], "neg"), int(first.positives[i])) for i, n in enumerate(names)]
        tensors = {
            n: summary.to_host([scores[n].detach().float().contiguous()])[0] for n in names
        }  # a matrix at a time
    else:
        tensors, truncated, k_of = _tails(scores, kind, order, unit, spec.fraction(kind), rows_dims or {}, first,
                                          gathered)  # fmt: skip
        shapes = {n: list(scores[n].shape) for n in names}
        meta.update(order=order, unit=unit, setting=spec.setting(kind), keep=repr(spec.fraction(kind)),
                    shapes=json.dumps(shapes), truncated=json.dumps(truncated), k=json.dumps(k_of))  # fmt: skip
    if kind == "harm":
        gini = summary.gini_from(scores, first.n, first.positive_hist, gathered=gathered)
        stats = ScoreStats(first.n, first.positive_sum, gini)
    meta["stats"] = json.dumps(asdict(stats))
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


# A tail's pass keeps the entries of its threshold's top-16-bit bin and above, unless they exceed this many
# times the tail plus the slack (values piled up in one bin): then three streamed passes (topk's).
_CANDIDATES_PER_K, _CANDIDATE_SLACK = 4, 1 << 24


def _home(scores: Mapping[str, torch.Tensor]) -> torch.device:
    """Where histograms and small results join: the first matrix's device."""
    return next(iter(scores.values())).device if scores else torch.device("cpu")


def _nonzero(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Flat positions of ``mask`` (ascending), whose number the host already knows: no sync off the CPU."""
    if mask.device.type == "cpu":
        return torch.nonzero(mask.view(-1)).view(-1)
    return torch.nonzero_static(mask.view(-1), size=count).view(-1)


def _positives(h: torch.Tensor, count: int) -> torch.Tensor:
    return h.view(-1)[_nonzero(h > 0, count)]


@dataclass(frozen=True)
class _FirstPass:
    """What one read of every matrix gives, on the host."""

    n: int
    positive_sum: float | None  # harm sets: sum of max(H, 0), float64, summed per matrix in matrix order
    positive_hist: torch.Tensor  # harm sets: the positives' top-16-bit histogram (the Gini's ranges)
    positives: torch.Tensor  # per matrix: how many H > 0
    eligible_hist: torch.Tensor  # per matrix (rows), bins of (key >> 16) + 2^15 of the eligible entries


def _first_pass(scores: Mapping[str, torch.Tensor], kind: str, order: str, unit: str) -> _FirstPass:
    home = _home(scores)
    counts, sums, eligible_hists, positive_hists = [], [], [], []
    for name in scores:
        s = scores[name]
        values = ranking(s, order)
        keys = float_keys(values)
        counts.append(summary.scored(s).to(home))
        if unit != "row":
            eligible_hists.append(summary.histogram((keys >> 16) + _HALF, eligible(values, kind)).to(home))
        if kind == "harm":
            h = values if order == "neg" else ranking(s, "neg")
            sums.append(h.clamp(min=0).sum(dtype=torch.float64).to(home))
            if order != "neg" or unit == "row":  # else the eligible histogram's upper half is this one
                positive_hists.append(summary.positive_histogram(h).to(home))
    empty = torch.zeros(0, 1, dtype=torch.int64, device=home)
    moved = summary.to_host([torch.stack(counts) if counts else empty.view(-1),
                   torch.stack(sums) if sums else empty.view(-1).double(),
                   torch.stack(eligible_hists) if eligible_hists else empty,
                   torch.stack(positive_hists) if positive_hists else empty])  # fmt: skip
    count, sum_, eligible_hist, positive_hist = moved
    if kind == "harm" and not positive_hists:
        positive_hist = eligible_hist[:, _HALF:]
    positives = positive_hist.sum(1) if positive_hist.numel() else torch.zeros(len(counts), dtype=torch.int64)
    full = torch.zeros(_BINS, dtype=torch.int64)
    if positive_hist.numel():
        full[: positive_hist.size(1)] = positive_hist.sum(0)
    return _FirstPass(int(count.sum()), sum(sum_.tolist()) if kind == "harm" else None, full, positives,
                      eligible_hist)  # fmt: skip


def _tails(
    scores: Mapping[str, torch.Tensor],
    kind: str,
    order: str,
    unit: str,
    keep: float,
    rows_dims: Mapping[str, int],
    first: _FirstPass,
    gathered: list[torch.Tensor] | None,
) -> tuple[dict[str, torch.Tensor], dict[str, bool], dict[str, int]]:
    """Per matrix: flat indices and raw S of the unit's exact top ``keep`` of the ranking; which units are cut.

    The top-k of a unit is the radix select of topk.top_k_threshold, its high pass taken from the counting
    pass: the second pass keeps each matrix's entries in the threshold's bin and above (the tail and a
    sliver), and the low pass and the ties are resolved on those. Ties: matrix order, then flat index.
    """
    names = list(scores)
    if unit == "row":
        return _row_tails(scores, kind, order, keep, rows_dims, gathered, first)
    units = [names] if unit == "global" else [[n] for n in names]
    where = {n: i for i, n in enumerate(names)}
    plans: dict[str, tuple[int, int, int]] = {}  # per matrix: its unit's k, threshold bin, entries above the bin
    truncated: dict[str, bool] = {}
    k_of: dict[str, int] = {}
    streamed: list[list[str]] = []
    for members in units:
        label = "*" if unit == "global" else members[0]
        k = round(keep * sum(scores[n].numel() for n in members))
        hist = first.eligible_hist[[where[n] for n in members]].sum(0)
        hist[0] = 0  # bin 0 holds EXCLUDED: never eligible
        total = int(hist.sum())
        truncated[label], k_of[label] = (total > k if k > 0 and total > 0 else False), k
        if k <= 0 or total == 0:
            continue
        hi, above = _bucket_from_top(hist, min(k, total))
        if int(hist[hi:].sum()) > _CANDIDATES_PER_K * k + _CANDIDATE_SLACK:
            streamed.append(members)
            continue
        plans.update({n: (min(k, total), hi, above) for n in members})
    found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # per planned matrix: candidates' flat index, key
    home = _home(scores)
    lows = []
    for i, name in enumerate(names):
        values = ranking(scores[name], order)
        if gathered is not None:
            h = values if order == "neg" else ranking(scores[name], "neg")
            gathered.append(_positives(h, int(first.positives[i])))
        if name not in plans:
            continue
        _, hi, _ = plans[name]
        keys = float_keys(values).masked_fill_(~eligible(values, kind), EXCLUDED).view(-1)
        flat = _nonzero(keys >= (hi - _HALF) * _BINS, int(first.eligible_hist[i, hi:].sum()))
        found[name] = (flat, keys[flat])
        lows.append(summary.histogram(found[name][1] & 0xFFFF, (found[name][1] >> 16) == hi - _HALF).to(home))
    low_of = dict(zip(found, summary.to_host([torch.stack(lows)])[0], strict=True)) if lows else {}
    picked: dict[str, torch.Tensor] = {}
    for members in units:
        planned = [n for n in members if n in found]
        if not planned:
            continue
        k, hi, above = plans[planned[0]]
        low = torch.stack([low_of[n] for n in planned]).sum(0)
        lo, above_lo = _bucket_from_top(low, k - above)
        key = (hi - _HALF) * _BINS + lo
        ties = k - above - above_lo  # keys equal to the threshold to take, in matrix order then flat index
        take_all = ties == int(low[lo])
        for name in planned:
            flat, keys = found[name]
            quota = int(low_of[name][lo]) if take_all else min(int(low_of[name][lo]), ties)
            ties -= quota
            chosen = (keys > key) | ((keys == key) & (torch.cumsum(keys == key, 0) <= quota))
            above_key = int(first.eligible_hist[where[name], hi + 1 :].sum()) + int(low_of[name][lo + 1 :].sum())
            picked[name] = flat[_nonzero(chosen, above_key + quota)]
    for members in streamed:
        picked.update(_streamed_tail(scores, kind, order, members, k_of["*" if unit == "global" else members[0]]))
    empty = torch.zeros(0, dtype=torch.long)
    return _pairs(scores, {n: picked.get(n, empty) for n in names}), truncated, k_of


def _streamed_tail(
    scores: Mapping[str, torch.Tensor], kind: str, order: str, members: list[str], k: int
) -> dict[str, torch.Tensor]:
    """A unit's tail by topk.top_k_threshold's three streamed passes: for values piled up in one bin."""
    from harmsweep.scoring.topk import top_k_threshold

    def keys_of(name: str) -> torch.Tensor:
        values = ranking(scores[name], order)
        return float_keys(values).masked_fill_(~eligible(values, kind), EXCLUDED)

    threshold = top_k_threshold(members, keys_of, k)
    return {n: torch.nonzero(threshold.mask(n, keys_of(n)).view(-1)).view(-1) for n in members}


def _row_tails(
    scores: Mapping[str, torch.Tensor],
    kind: str,
    order: str,
    keep: float,
    rows_dims: Mapping[str, int],
    gathered: list[torch.Tensor] | None,
    first: _FirstPass,
) -> tuple[dict[str, torch.Tensor], dict[str, bool], dict[str, int]]:
    """Per row: the exact top ``keep`` of each row (a stable sort per row, on the matrix's device)."""
    picked, cut, k_of = {}, [], {}
    for i, name in enumerate(scores):
        dim = rows_dims.get(name, 0)
        values = ranking(scores[name], order)
        if gathered is not None:
            gathered.append(_positives(values if order == "neg" else ranking(scores[name], "neg"),
                                       int(first.positives[i])))  # fmt: skip
        rows = values.transpose(0, 1) if dim == 1 else values
        ok = eligible(rows, kind)
        k = round(keep * rows.size(1))
        idx, kept = row_top(rows.masked_fill(~ok, _NEG_INF), k)
        chosen = torch.zeros_like(ok).scatter_(1, idx, kept)
        picked[name] = torch.nonzero((chosen.transpose(0, 1) if dim == 1 else chosen).reshape(-1)).view(-1)
        cut.append((ok.sum(1) > k).to(torch.uint8))
        k_of[name] = k
    tensors = _pairs(scores, picked)
    for name, rows_cut in zip(scores, summary.to_host(cut), strict=True):
        tensors[f"{name}/truncated_rows"] = rows_cut
    return tensors, {}, k_of


def _pairs(scores: Mapping[str, torch.Tensor], picked: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Flat indices (int32) and raw S of each matrix's tail, gathered on its device, then moved."""
    pairs = [_pair(name, flat, scores[name]) for name, flat in picked.items()]
    moved = iter(summary.to_host([t for pair in pairs for t in pair]))
    out = {}
    for name in picked:
        out[f"{name}/index"], out[f"{name}/value"] = next(moved).contiguous(), next(moved).contiguous()
    return out


def _pair(name: str, flat: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if s.numel() >= 2**31:
        raise HarmsweepError(f"{name} has {s.numel():,} entries: more than int32 flat indices address")
    flat = flat.to(s.device)
    return flat.to(torch.int32), s.detach().reshape(-1)[flat].float()
