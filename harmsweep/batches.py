"""Padded batches of token ids: one builder for every place that batches rows of different lengths.

Generation and last-token readouts pad on the left (every row ends at the last column); likelihoods and
scoring pad on the right (labels line up with the inputs). Sums over samples (scores, NLLs) do not depend
on the order of samples, so callers may batch rows of similar length together.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch

Tensors = dict[str, torch.Tensor]


def padded(rows: Sequence[Sequence[int]], pad_id: int | None, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` (int64, on the host) of ``rows`` padded to the longest one.

    ``side="left"`` puts the padding first; ``pad_id`` None (a tokenizer without one) pads with 0, which the
    attention mask hides.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side={side} is not one of left, right")
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), 0 if pad_id is None else pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.as_tensor(list(row), dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def trim_padding(batch: Mapping[str, torch.Tensor]) -> Tensors:
    """Drop trailing all-padding columns of a right-padded batch (a batch of short rows computes less)."""
    width = int(batch["attention_mask"].sum(dim=1).max())
    return {k: v[:, :width] for k, v in batch.items()}


def iter_batches(tensors: Mapping[str, torch.Tensor], batch_size: int, by_length: bool = False) -> Iterator[Tensors]:
    """Consecutive batches; with ``by_length``, samples of similar length batched together, longest first.

    Sums over samples (scores, mean NLL) do not depend on the order, and grouping by length cuts the
    padding each batch computes on; longest first makes an out-of-memory batch fail at once.
    """
    n = tensors["input_ids"].size(0)
    if by_length:
        order = torch.sort(tensors["attention_mask"].sum(dim=1), descending=True, stable=True).indices
        tensors = {k: v[order] for k, v in tensors.items()}
    for start in range(0, n, batch_size):
        yield {k: v[start : start + batch_size] for k, v in tensors.items()}
