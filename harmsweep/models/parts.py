"""Model anatomy: which weights are scored (every linear layer inside the decoder blocks), where each sits, and
the attention head size. One answer shared by scoring, pruning, activations, sizing and fine-tuning."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D

LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)


@dataclass(frozen=True)
class ScoredParam:
    """Where a scored weight sits: used for per-layer and per-module-type counts and row ranking."""

    name: str  # as in model.named_parameters()
    layer: int  # index of the decoder block
    module_type: str  # attribute name of the linear module: q_proj, down_proj, c_attn, ...
    rows_dim: int  # dimension indexing output units (0 for nn.Linear, 1 for GPT-2's Conv1D)


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks, found by structure rather than by name.

    It is the largest (by parameter count) ModuleList whose children contain linear layers: that is
    model.layers for Llama/Qwen2/Gemma3 and transformer.h for GPT-2.
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if not any(isinstance(m, LINEAR_TYPES) for m in module.modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no ModuleList of blocks with linear layers")
    return best[1], best[2]


def scored_parameters(model: nn.Module) -> dict[str, ScoredParam]:
    """Weights of every linear layer inside the decoder blocks; embeddings, lm_head, norms, biases excluded."""
    prefix, blocks = decoder_blocks(model)
    param_names = {id(p): n for n, p in model.named_parameters()}
    found: dict[str, ScoredParam] = {}
    for layer, block in enumerate(blocks):
        for sub_name, module in block.named_modules():
            if isinstance(module, LINEAR_TYPES) and id(module.weight) in param_names:
                name = param_names[id(module.weight)]
                rows_dim = 1 if isinstance(module, Conv1D) else 0
                found[name] = ScoredParam(name, layer, sub_name.rsplit(".", 1)[-1], rows_dim)
    if not found:
        raise ValueError(f"no linear layers found inside {prefix} of {type(model).__name__}")
    return found


def head_dim(model: nn.Module) -> int | None:
    """The attention head size (granularity=head), from the model's config."""
    config = getattr(model, "config", None)
    size = getattr(config, "head_dim", None)
    heads = getattr(config, "num_attention_heads", None)
    if not size and heads:
        size = getattr(config, "hidden_size", 0) // heads
    return int(size) if size else None
