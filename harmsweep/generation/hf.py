"""Batched generation with left padding and the KV cache: greedy, or per-prompt seeded sampling (seeded.py).

Prompts arrive as token ids (already templated, possibly with a prefilled assistant prefix), are
sorted by length so each batch pads little, and come back in their original order. The optional
vLLM backend (GPU clusters, ``pip install 'harmsweep[vllm]'``) is imported only when selected: one
engine per job reads the model's checkpoint and applies the run's mask inside itself
(harmsweep/generation/vllm.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from harmsweep.batches import padded
from harmsweep.devices import input_device
from harmsweep.errors import HarmsweepError
from harmsweep.generation.sampling import BACKENDS, EngineInputs, Sampling, _cut, _stop_ids
from harmsweep.generation.seeded import SeededSampler, prompt_seeds


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    sampling: Sampling,
    batch_size: int,
    desc: str = "generating",
    backend: str = "hf",
    engine: EngineInputs | None = None,
) -> list[list[int]]:
    """Continuation ids of each prompt, cut before the first end-of-sequence token.

    Sampling is per prompt (``Sampling``): a prompt's answer does not depend on its batch, its order or the backend's
    batch size; greedy runs the model's own greedy ``generate`` (its generation config's processors included).
    """
    if backend == "vllm":
        from harmsweep.generation.vllm import generate_vllm

        engine = engine or EngineInputs()
        raw = generate_vllm(model, tokenizer, prompts, sampling, engine.source, engine.fingerprint, engine.mask)
        stops = _stop_ids(model, tokenizer)
        return [_cut(c, stops) for c in raw]
    if backend != "hf":
        raise HarmsweepError(f"eval.generation.backend={backend} is not one of {', '.join(BACKENDS)}")
    stops = _stop_ids(model, tokenizer)
    device = input_device(model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    seeds = prompt_seeds(prompts, sampling) if sampling.do_sample else []
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", leave=False)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, mask = padded([prompts[i] for i in chunk], tokenizer.pad_token_id, side="left")
        width = ids.size(1)
        extra: dict[str, Any] = {}
        if sampling.do_sample:  # greedy over the sampler's noisy scores; its own penalty replaces the model config's
            sampler = SeededSampler(
                [seeds[i] for i in chunk],
                [width - len(prompts[i]) for i in chunk],
                sampling.temperature,
                sampling.top_k,
                sampling.top_p,
                sampling.repetition_penalty,
            )
            extra = {"logits_processor": LogitsProcessorList([sampler]), "repetition_penalty": 1.0}
        with torch.no_grad():
            generated = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=sampling.max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=sorted(stops),
                **extra,
            )
        for row, i in enumerate(chunk):
            out[i] = _cut(generated[row, width:].tolist(), stops)
        bar.update(len(chunk))
    bar.close()
    return out
