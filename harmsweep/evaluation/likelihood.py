"""Judge-free harm metric: how likely the model still finds held-out harmful vs benign responses.

Pruning that removes harmful generation should raise the NLL of harmful responses much more than
that of benign ones; the suite reports both and their ratio (selectivity).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import PreTrainedModel

from harmsweep.calibration import iter_batches
from harmsweep.devices import input_device
from harmsweep.losses import per_sample_nll


def mean_response_nll(model: PreTrainedModel, tensors: Mapping[str, torch.Tensor], batch_size: int) -> float:
    """Mean over samples of each sample's mean per-token NLL of its response (same loss as scoring)."""
    device = input_device(model)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in iter_batches(tensors, batch_size, by_length=True):
            width = int(batch["attention_mask"].sum(dim=1).max())
            out = model(
                input_ids=batch["input_ids"][:, :width].to(device),
                attention_mask=batch["attention_mask"][:, :width].to(device),
                use_cache=False,
            )
            nll = per_sample_nll(out.logits, batch["labels"][:, :width].to(device))
            total += float(nll.sum())
            count += nll.numel()
    return total / count
