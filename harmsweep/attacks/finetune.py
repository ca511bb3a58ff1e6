"""The authors' fine-tuning attack: a LoRA adapter trained on harmful pairs, merged into the model in place.

Their recipe (TRL ``SFTTrainer`` + PEFT, reference §5.3): r 128, alpha 16, dropout 0, no bias, the q/k/v/o/gate/up/
down projections, batch 5, 5 epochs, lr 2e-4, AdamW (``adamw_torch``) with weight decay 0.01, linear schedule with
warmup ratio 0.05, seed = the run's seed, prompt-completion chat pairs with a completion-only loss, max length 1024,
merged with ``merge_and_unload``. Here the training loop is harmsweep's own (``alignment.finetune.finetune``, LoRA
through peft, merged at the end, nothing held at zero) with the recipe as a ``FinetuneSpec``. Where it differs from
TRL 0.22.1 / transformers 4.56 (their versions):

- Loss: ``finetune`` takes, per optimizer step, the mean over the batch of each pair's mean response-token NLL
  (``response_nll(...).mean()``); TRL's is the token mean over the batch (the model's loss with ``-100`` labels,
  every response token weighted equally). Long responses weigh more in theirs.
- Labelled tokens: theirs are everything after ``apply_chat_template(prompt)`` without a generation prompt, so the
  assistant header (e.g. Llama's ``<|start_header_id|>assistant<|end_header_id|>\\n\\n``) is trained too (TRL
  stopped doing that after 0.23, PR #4201); here the prompt is rendered with the generation prompt, as at
  generation, and the labels are the response plus the template's end-of-turn text (``turn_end``: ``<|eot_id|>``,
  ``<|im_end|>\\n``, ...), which TRL also trains; with the plain template the end is the EOS token (TRL's
  ``add_eos`` for non-chat data).
- Length: TRL cuts the joined sequence at max_length (a prompt that long leaves no label); here the response is
  cut to what the prompt leaves and a prompt that leaves nothing is an error.
- No gradient clipping (HF Trainer clips the global norm at 1.0); batches are a ``torch.randperm`` per epoch
  seeded by the run's seed, not the Trainer's sampler; the adapter is initialised after ``torch.manual_seed(seed)``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from harmsweep.alignment.spec import FinetuneSpec
from harmsweep.attacks.spec import HarmfulFinetuneConfig
from harmsweep.calibration.pairs import Pair, encode_pairs, resolve_template
from harmsweep.data.records import Record
from harmsweep.errors import HarmsweepError
from harmsweep.losses import IGNORE
from harmsweep.models.parts import scored_parameters

log = logging.getLogger(__name__)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # their target_modules
ADAPTER_BYTES = 16  # per LoRA parameter: fp32 weight (peft upcasts bf16/fp16 adapters), fp32 grad, AdamW's 2 moments
MERGE_BYTES = 8  # per entry of the largest adapted matrix: the fp32 delta B A and the promoted sum of the merge
_SENTINEL = "HARMSWEEP_TURN_END_SENTINEL"


def optimizer_steps(n_pairs: int, batch_size: int, epochs: int) -> int:
    """HF Trainer's step count with grad-accum 1: ceil(n / batch) batches per epoch (the last one short), per epoch."""
    return math.ceil(n_pairs / batch_size) * epochs


def warmup_steps(total_steps: int, ratio: float) -> int:
    """transformers' ``TrainingArguments.get_warmup_steps`` for a ratio: ceil(ratio * total optimizer steps)."""
    return math.ceil(total_steps * ratio)


def finetune_spec(cfg: HarmfulFinetuneConfig, n_pairs: int, seed: int) -> FinetuneSpec:
    """Their recipe as a FinetuneSpec for ``n_pairs`` pairs. The targets are their seven projection names: on Llama,
    Qwen2, Mistral, OLMo and Gemma3 these are exactly harmsweep's scored linears (what ``targets=[]`` would pick)."""
    cfg.validate()
    if n_pairs < 1:
        raise HarmsweepError("the fine-tuning attack needs at least one harmful pair")
    spec = FinetuneSpec(
        method="lora",
        rank=int(cfg.rank),
        alpha=float(cfg.alpha),
        rslora=False,
        dropout=0.0,
        lr=float(cfg.lr),
        epochs=int(cfg.epochs),
        max_steps=None,
        batch_size=int(cfg.batch_size),
        grad_accum=1,
        weight_decay=float(cfg.weight_decay),
        warmup_steps=warmup_steps(optimizer_steps(n_pairs, int(cfg.batch_size), int(cfg.epochs)), cfg.warmup_ratio),
        max_length=int(cfg.max_length),
        seed=int(seed),
        targets=list(TARGETS),
    )
    spec.validate()
    return spec


def model_targets(model: nn.Module, wanted: Sequence[str] = TARGETS) -> list[str]:
    """The wanted module types the model has; empty (every scored linear) when it has none of them (GPT-2's c_attn,
    c_fc, c_proj), so the attack still adapts every decoder linear there."""
    types = {p.module_type for p in scored_parameters(model).values()}
    have = [t for t in wanted if t in types]
    if not have:
        log.info("the model has none of %s: the fine-tuning attack adapts every decoder linear", ", ".join(wanted))
    return have


def adapted_names(model: nn.Module, targets: Sequence[str] = TARGETS) -> list[str]:
    """Weight names the merged adapter rewrites (snapshot these to undo the attack: ``WeightSnapshot.of_parameters``)."""
    wanted = set(model_targets(model, targets))
    return [n for n, p in scored_parameters(model).items() if not wanted or p.module_type in wanted]


@dataclass(frozen=True)
class FinetuneBytes:
    """Memory the attack needs beside the model's weights and activations (which the plan sizes already)."""

    adapter_params: int  # LoRA parameters: rank * (rows + cols) per adapted matrix
    device: int  # adapter weights, gradients and AdamW moments (fp32), plus the largest merge transient
    host: int  # the snapshot of the adapted matrices, in their dtype, that undoes the merge after generation


def finetune_bytes(shapes: Iterable[tuple[int, int]], rank: int, param_bytes: int) -> FinetuneBytes:
    """Sizes for the plan from the adapted matrices' (rows, cols) and the weights' element size."""
    shapes = [(int(r), int(c)) for r, c in shapes]
    adapter = sum(rank * (r + c) for r, c in shapes)
    merge = max((r * c for r, c in shapes), default=0) * MERGE_BYTES
    host = sum(r * c for r, c in shapes) * param_bytes
    return FinetuneBytes(adapter, adapter * ADAPTER_BYTES + merge, host)


def model_finetune_bytes(model: nn.Module, cfg: HarmfulFinetuneConfig) -> FinetuneBytes:
    """``finetune_bytes`` of a loaded (or meta-device) model under the attack block's rank."""
    named = dict(model.named_parameters())
    params = [named[n] for n in adapted_names(model)]
    size = max((p.element_size() for p in params), default=4)
    return finetune_bytes([(p.shape[0], p.shape[1]) for p in params], int(cfg.rank), size)


def turn_end(tokenizer: PreTrainedTokenizerBase, template: str) -> str:
    """Text that closes an assistant turn, trained with the response (TRL trains it too): with the chat template,
    what the template writes after the assistant's content; with the plain template, the EOS token."""
    if template != "chat":
        return tokenizer.eos_token or ""
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _SENTINEL}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    at = text.rfind(_SENTINEL)
    return text[at + len(_SENTINEL) :] if at >= 0 else ""


def encode_harmful(
    tokenizer: PreTrainedTokenizerBase, records: Sequence[Record], template: str, max_length: int
) -> dict[str, Any]:
    """input_ids / attention_mask / labels of user=prompt, assistant=response + end of turn; labels on the
    assistant turn only (prompt, generation header and padding are -100)."""
    template = resolve_template(tokenizer, template)
    end = turn_end(tokenizer, template)
    missing = [r.source_id for r in records if not r.response]
    if missing:
        raise HarmsweepError(f"harmful fine-tune: {len(missing)} pairs have no response (first: {missing[0]})")
    pairs = [Pair(r.prompt, f"{r.response}{end}", r.source_id, r.category) for r in records]
    return encode_pairs(tokenizer, pairs, template, max_length)


def harmful_finetune(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Record],
    cfg: HarmfulFinetuneConfig,
    *,
    template: str,
    seed: int,
) -> dict[str, Any]:
    """Train the attack's LoRA on ``records`` and merge it into ``model`` in place (pruned zeros are not held: the
    merge writes over them, as in their code). Returns stats: pairs, steps, warmup, first/final loss, seconds."""
    from harmsweep.alignment.finetune import finetune  # peft at call time only

    if not records:
        raise HarmsweepError("the fine-tuning attack needs at least one harmful pair (attack.finetune.file)")
    spec = finetune_spec(cfg, len(records), seed)
    spec.targets = model_targets(model)
    tensors = encode_harmful(tokenizer, records, template, spec.max_length)
    start = time.perf_counter()
    losses = finetune(model, tensors, spec, frozen=None)
    seconds = time.perf_counter() - start
    log.info("harmful fine-tune: %d pairs, %d steps, loss %.4f -> %.4f", len(records), len(losses), losses[0],
             losses[-1])  # fmt: skip
    return {
        "pairs": len(records),
        "response_tokens": int((tensors["labels"][:, 1:] != IGNORE).sum()),
        "steps": len(losses),
        "warmup_steps": spec.warmup_steps,
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "seconds": round(seconds, 3),
    }
