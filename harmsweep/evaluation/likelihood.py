"""Judge-free harm metric: how likely the model still finds held-out harmful vs benign responses.

Pruning that removes harmful generation should raise the NLL of harmful responses much more than
that of benign ones; the suite reports both and their ratio (selectivity).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import PreTrainedModel

from harmsweep.batches import iter_batches
from harmsweep.devices import input_device
from harmsweep.losses import DEFAULT_LOGITS_CHUNK, response_nll


def mean_response_nll(
    model: PreTrainedModel,
    tensors: Mapping[str, torch.Tensor],
    batch_size: int,
    logits_chunk: int = DEFAULT_LOGITS_CHUNK,
) -> float:
    """Mean over samples of each sample's mean per-token NLL of its response (same loss as scoring)."""
    nlls = response_nlls(model, tensors, batch_size, logits_chunk=logits_chunk)
    return sum(nlls) / len(nlls)


def response_nlls(
    model: PreTrainedModel,
    tensors: Mapping[str, torch.Tensor],
    batch_size: int,
    logits_chunk: int = DEFAULT_LOGITS_CHUNK,
) -> list[float]:
    """Each sample's mean per-token response NLL, in the set's order (the per-item values of the bootstrap).

    At most ``logits_chunk`` positions' fp32 logits exist at once (``model.logits_chunk``), and only response
    positions get logits at all.
    """
    device = input_device(model)
    n = tensors["input_ids"].size(0)
    out = [0.0] * n
    indexed = {**tensors, "index": torch.arange(n)}  # batches are formed by length: remember where each row was
    with torch.no_grad():
        for batch in iter_batches(indexed, batch_size, by_length=True):
            width = int(batch["attention_mask"].sum(dim=1).max())
            nll = response_nll(
                model,
                batch["input_ids"][:, :width].to(device),
                batch["attention_mask"][:, :width].to(device),
                batch["labels"][:, :width],  # on the host: the labelled positions are found there
                logits_chunk=logits_chunk,
            )
            for i, value in zip(batch["index"].tolist(), nll.tolist(), strict=True):
                out[i] = float(value)
    return out
