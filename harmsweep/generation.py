"""Batched greedy generation with left padding and the KV cache.

Prompts arrive as token ids (already templated, possibly with a prefilled assistant prefix), are
sorted by length so each batch pads little, and come back in their original order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def generate_greedy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int,
    desc: str = "generating",
) -> list[list[int]]:
    """Greedy continuation ids of each prompt, cut before the first end-of-sequence token."""
    pad = tokenizer.pad_token_id
    stop = model.generation_config.eos_token_id
    stops = set(stop if isinstance(stop, list) else [stop]) | {tokenizer.eos_token_id}
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", leave=False)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        with torch.no_grad():
            generated = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=sorted(stops),
            )
        for row, i in enumerate(chunk):
            continuation = generated[row, width:].tolist()
            cut = next((j for j, t in enumerate(continuation) if t in stops), len(continuation))
            out[i] = continuation[:cut]
        bar.update(len(chunk))
    bar.close()
    return out
