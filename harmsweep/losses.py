"""The response-only loss shared by scoring and evaluation.

Per-sample token-mean cross-entropy over the positions whose label is not -100 (the response),
so prompt and padding never contribute and long responses do not outweigh short ones.

Full-vocabulary fp32 logits are the largest tensors of a forward (32 x 1024 x 128,256 fp32 is 17 GB,
and the loss's log-softmax and gradient as much again), so ``response_nll`` never makes them: it
takes the final hidden states, keeps the labelled positions only, and runs the output layer and the
cross-entropy over ``logits_chunk`` positions at a time, each chunk under activation checkpointing so
that the backward of scoring also holds one chunk's logits at a time.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional
from torch.utils.checkpoint import checkpoint

from harmsweep.errors import HarmsweepError

IGNORE = -100
DEFAULT_LOGITS_CHUNK = 2048  # token positions whose fp32 logits exist at once (model.logits_chunk)

log = logging.getLogger(__name__)

# Causal-LM classes whose logits are exactly output_layer(base_model(...)[0]) (checked against their
# forward in transformers 5.x), and those that transform them after the head, in the model's dtype as
# transformers does. Anything else takes the full-logits path (still chunked in fp32).
_PLAIN_HEAD = frozenset(
    {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gpt2", "olmo", "olmo2",
     "olmo3", "phi", "phi3", "starcoder2", "smollm3", "gpt_neox"}
)  # fmt: skip
_SOFTCAPPED = frozenset({"gemma2", "gemma3_text"})  # tanh(logits / cap) * cap (final_logit_softcapping)
_SCALED = frozenset({"cohere", "cohere2"})  # logits * logit_scale
_DIVIDED = frozenset({"granite", "granitemoe"})  # logits / logits_scaling
_warned: set[str] = set()


def per_sample_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over each sample's labelled positions, shape (batch,), in fp32, from full logits.

    Holds (batch, length, vocab) fp32: for small models and callers that already have the logits;
    the model-level ``response_nll`` bounds that memory.
    """
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


def response_nll(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    logits_chunk: int = DEFAULT_LOGITS_CHUNK,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """``per_sample_nll`` of the model's logits, shape (batch,), fp32, with at most ``logits_chunk`` positions'
    fp32 logits alive at once (forward and backward). Differentiable: scoring backpropagates through it."""
    counted = (labels[:, 1:] != IGNORE).sum(dim=1)
    if bool((counted == 0).any()):  # labels come from the host: no device sync
        raise ValueError("a sample has no response tokens to score")
    sums = nll_sums(model, input_ids, attention_mask, labels, logits_chunk=logits_chunk, position_ids=position_ids)
    return sums / counted.to(sums.device, non_blocking=True)


def nll_sums(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    logits_chunk: int = DEFAULT_LOGITS_CHUNK,
    position_ids: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Each sample's summed next-token NLL over its labelled positions (``labels[:, 1:] != -100``), shape (batch,).

    Only labelled positions get logits (prompt and padding never do). The result sits on the device of the
    last layer (a model spread over GPUs ends there). Inputs must sit on the embedding's device
    (``devices.input_device``); labels may stay on the host, where the labelled positions are found without a
    device sync. ``dtype``: what the per-token values are summed in (float64 for perplexity's long sums).
    """
    if int(logits_chunk) < 1:
        raise HarmsweepError(f"model.logits_chunk={logits_chunk} must be at least 1")
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if position_ids is not None:
        inputs["position_ids"] = position_ids
    shift = labels[:, 1:]
    picked = (shift != IGNORE).reshape(-1).nonzero().squeeze(1)  # on the labels' device: the host, in practice
    targets = shift.reshape(-1).index_select(0, picked)
    width = shift.size(1)
    rows = torch.div(picked, width, rounding_mode="floor")
    positions = rows * labels.size(1) + picked % width  # where in (batch, length) each predicting state sits
    inner = _lora_unwrapped(model)
    head = output_head(inner)
    if head is None:
        states = model(**inputs).logits  # full logits in the model's dtype; only their fp32 copy is chunked
        head = _identity
    else:
        states = inner.base_model(**inputs)[0]
    states = states.reshape(-1, states.size(-1)).index_select(0, positions.to(states.device, non_blocking=True))
    targets = targets.to(states.device, non_blocking=True)
    step = functools.partial(_chunk_nll, head)
    grad = torch.is_grad_enabled() and states.requires_grad
    token = torch.cat(
        [
            checkpoint(step, s, t, use_reentrant=False, preserve_rng_state=False) if grad else step(s, t)
            for s, t in zip(states.split(int(logits_chunk)), targets.split(int(logits_chunk)), strict=True)
        ]
    )
    sums = torch.zeros(labels.size(0), dtype=dtype, device=token.device)
    return sums.index_add_(0, rows.to(token.device, non_blocking=True), token.to(dtype))


def output_head(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """hidden states -> logits exactly as the model's forward makes them, or None for an architecture whose
    head is not vouched for here (its callers then take the full logits from the model's forward)."""
    from transformers import PreTrainedModel

    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    layer = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None
    vouched = kind in _PLAIN_HEAD | _SOFTCAPPED | _SCALED | _DIVIDED
    if not vouched or layer is None or getattr(model, "base_model", model) is model:
        name = f"{type(model).__name__} ({kind})"
        if name not in _warned:
            _warned.add(name)
            log.info("%s: its logits are not known to be head(hidden states); the loss uses full logits", name)
        return None
    if kind in _SOFTCAPPED and getattr(config, "final_logit_softcapping", None) is not None:
        return functools.partial(_softcapped, layer, float(config.final_logit_softcapping))
    if kind in _SCALED:
        return functools.partial(_scaled, layer, float(getattr(model, "logit_scale", config.logit_scale)))
    if kind in _DIVIDED:
        return functools.partial(_divided, layer, float(config.logits_scaling))
    return layer


def _lora_unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft LoRA wrapper: LoRA acts inside its layers, so its base model and
    head are the wrapper's. Prompt-learning adapters change the inputs: they stay wrapped (full logits)."""
    config = getattr(model, "active_peft_config", None)
    if config is None or getattr(config, "is_prompt_learning", True) or not hasattr(model, "get_base_model"):
        return model
    return model.get_base_model()


def _chunk_nll(
    head: Callable[[torch.Tensor], torch.Tensor], states: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """One chunk's per-token NLL: its logits (fp32) live only inside this call (recomputed in backward)."""
    logits = head(states).float()
    return functional.cross_entropy(logits, targets.to(logits.device), reduction="none")


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _softcapped(layer: nn.Module, cap: float, hidden: torch.Tensor) -> torch.Tensor:
    return torch.tanh(layer(hidden) / cap) * cap


def _scaled(layer: nn.Module, scale: float, hidden: torch.Tensor) -> torch.Tensor:
    return layer(hidden) * scale


def _divided(layer: nn.Module, scale: float, hidden: torch.Tensor) -> torch.Tensor:
    return layer(hidden) / scale
