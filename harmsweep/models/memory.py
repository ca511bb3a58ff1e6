"""What a model needs in memory, from its config alone: built on the ``meta`` device (shapes, no storage, no
weights read), which gives N and the weight bytes exactly.

Activation memory is measured the same way: one forward on meta of a 1- and a 2-layer copy of the model,
counting the bytes autograd saves for backward (parameters excluded), with attention standing in for a fused
(flash / memory-efficient) kernel as used on GPUs, which saves q, k, v, the output and a log-sum-exp. The
difference is one block's cost; the rest (embedding, final norm, logits, the fp32 loss) is the head.
``harmsweep plan`` (sweep/sizing.py) turns these into the GPU memory, time and disk of a job.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from harmsweep.models.parts import scored_parameters

_ATTENTION = "harmsweep_plan"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """What sizing needs of a model: counts from the meta-built model, activations per token."""

    n_scored: int
    n_params: int
    n_layers: int
    hidden: int
    intermediate: int
    largest_matrix: int
    dtype_bytes: int
    kv_bytes_per_token: int  # K and V of every layer, model dtype
    layer_input_bytes_per_token: int  # what a checkpointed block keeps
    block_act_bytes_per_token: float  # saved for backward by one block, per token
    head_act_bytes_per_token: float  # embedding, norm, logits and the fp32 loss, per token

    @property
    def weight_bytes(self) -> int:
        return self.n_params * self.dtype_bytes

    def activation_bytes(self, tokens: int, checkpointing: bool) -> float:
        """Peak activation memory of one fwd+bwd over ``tokens`` tokens (batch x length).

        The backward of the loss briefly holds the logits' fp32 gradient beside what was saved,
        counted here as a third of the head's saved bytes (its fp32 log-softmax is two thirds).
        """
        head = self.head_act_bytes_per_token * tokens * (4 / 3)
        if checkpointing:
            blocks = self.n_layers * self.layer_input_bytes_per_token * tokens + self.block_act_bytes_per_token * tokens
        else:
            blocks = self.n_layers * self.block_act_bytes_per_token * tokens
        return head + blocks


class _FusedAttention(torch.autograd.Function):
    """Saves what a fused attention kernel saves: q, k, v, the output and the fp32 log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fused_attention(module, q, k, v, attention_mask, **kwargs):
    return _FusedAttention.apply(q, k, v).transpose(1, 2), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(_ATTENTION, _fused_attention)
    AttentionMaskInterface.register(_ATTENTION, lambda *args, **kwargs: None)


def meta_model(config: PretrainedConfig, dtype: torch.dtype, layers: int | None = None) -> torch.nn.Module:
    """The model of ``config`` on the meta device (optionally cut to ``layers`` blocks): no storage."""
    config = copy.deepcopy(config)
    if layers is not None:
        config.num_hidden_layers = layers
        for key in ("layer_types",):  # per-layer lists must match the new depth
            if isinstance(getattr(config, key, None), list):
                setattr(config, key, getattr(config, key)[:layers])
    config._attn_implementation = _ATTENTION
    _register_attention()
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def saved_bytes(model: torch.nn.Module, batch: int, length: int) -> int:
    """Bytes autograd saves for one forward + loss with the scored weights requiring grad.

    Works on any device: on meta for planning, on a real device to check the plan against.
    """
    scored = scored_parameters(model)
    weights = {id(p) for p in model.parameters()}
    for name, p in model.named_parameters():
        p.requires_grad_(name in scored)
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        base = t._base if t._base is not None else t
        if id(t) not in weights and id(base) not in weights:
            total += t.numel() * t.element_size()
        return t

    ids = torch.zeros(batch, length, dtype=torch.long, device=next(model.parameters()).device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        # the loss of losses.per_sample_nll (its token counts need data; what it saves is the cross-entropy's)
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), ids[:, 1:].reshape(-1))
    return total


def model_shape(config: PretrainedConfig, dtype: str) -> ModelShape:
    """Counts and per-token activation costs of ``config`` in ``dtype``, all on the meta device."""
    torch_dtype = getattr(torch, dtype)
    full = meta_model(config, torch_dtype)
    params = scored_parameters(full)
    named = dict(full.named_parameters())
    sizes = [named[n].numel() for n in params]
    n_layers = int(config.num_hidden_layers)
    batch, length = 2, 64
    one, two = (saved_bytes(meta_model(config, torch_dtype, k), batch, length) for k in (1, 2))
    tokens = batch * length
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    elt = DTYPE_BYTES[dtype]
    return ModelShape(
        n_scored=sum(sizes),
        n_params=sum(p.numel() for p in full.parameters()),
        n_layers=n_layers,
        hidden=int(config.hidden_size),
        intermediate=int(getattr(config, "intermediate_size", None) or 4 * config.hidden_size),
        largest_matrix=max(sizes),
        dtype_bytes=elt,
        kv_bytes_per_token=2 * n_layers * kv_heads * head_dim * elt,
        layer_input_bytes_per_token=config.hidden_size * elt,
        block_act_bytes_per_token=(two - one) / tokens,
        head_act_bytes_per_token=(2 * one - two) / tokens,
    )
