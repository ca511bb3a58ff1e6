"""The response-only loss shared by scoring and evaluation.

Per-sample token-mean cross-entropy over the positions whose label is not -100 (the response),
so prompt and padding never contribute and long responses do not outweigh short ones.
"""

from __future__ import annotations

import torch
from torch.nn import functional

IGNORE = -100


def per_sample_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over each sample's labelled positions, shape (batch,), in fp32."""
    shift_logits = logits[:, :-1, :]
    shift_labels = labels[:, 1:].to(logits.device)  # the last layer's device when a model spans GPUs
    nll = functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)).float(),
        shift_labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    ).view(shift_labels.shape)
    counted = (shift_labels != IGNORE).sum(dim=1)
    if bool((counted == 0).any()):
        raise ValueError("a sample has no response tokens to score")
    return nll.sum(dim=1) / counted
