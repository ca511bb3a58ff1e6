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
from harmsweep.losses import per_sample_nll


def mean_response_nll(model: PreTrainedModel, tensors: Mapping[str, torch.Tensor], batch_size: int) -> float:
    """Mean over samples of each sample's mean per-token NLL of its response (same loss as scoring)."""
    nlls = response_nlls(model, tensors, batch_size)
    return sum(nlls) / len(nlls)


def response_nlls(model: PreTrainedModel, tensors: Mapping[str, torch.Tensor], batch_size: int) -> list[float]:
    """Each sample's mean per-token response NLL, in the set's order (the per-item values of the bootstrap)."""
    device = input_device(model)
    n = tensors["input_ids"].size(0)
    out = [0.0] * n
    indexed = {**tensors, "index": torch.arange(n)}  # batches are formed by length: remember where each row was
    with torch.no_grad():
        for batch in iter_batches(indexed, batch_size, by_length=True):
            width = int(batch["attention_mask"].sum(dim=1).max())
            logits = model(
                input_ids=batch["input_ids"][:, :width].to(device),
                attention_mask=batch["attention_mask"][:, :width].to(device),
                use_cache=False,
            ).logits
            nll = per_sample_nll(logits, batch["labels"][:, :width].to(device))
            for i, value in zip(batch["index"].tolist(), nll.tolist(), strict=True):
                out[i] = float(value)
    return out
