"""Calibration pairs: (prompt, response) tokenised so that the loss falls on response tokens only.

Aligned models refuse harmful prompts, so harmful responses come from a file, from the model itself
(on-policy), or from the model under a prefilling attack: its assistant turn starts with the first k
tokens of the dataset's affirmative target ("Sure, here is ...") or of a real answer (generation/prefixes.py)
and it continues from there.
Chat models are formatted with their chat template; base models with PLAIN_TEMPLATE (recorded). With
calibration.format=btap the scoring sets take the authors' raw-text tokenisation instead (``btap_ids``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from harmsweep.artifacts import atomic_path, write_jsonl
from harmsweep.batches import padded
from harmsweep.data.records import Record
from harmsweep.errors import HarmsweepError
from harmsweep.generation.hf import generate
from harmsweep.generation.sampling import PROMPT_FORMATS, EngineInputs, Sampling
from harmsweep.generation.seeded import content_key
from harmsweep.losses import IGNORE

log = logging.getLogger(__name__)

PLAIN_TEMPLATE = "User: {prompt}\nAssistant:\n"
BTAP_PLAIN = "Q: {prompt}\nA:"  # prompt_format=btap: the authors' base-model prompt (prefilled: attack_prompts)
RESPONSE_MODES = ("prefill", "on_policy", "file")
Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Pair:
    """A prompt and its response; ``prefix`` is the forced start of a prefilled answer (decoded), which ``response``
    begins with (response = the decoded prefix and continuation together)."""

    prompt: str
    response: str
    source_id: str
    category: str | None = None
    prefix: str = ""

    @property
    def continuation(self) -> str:
        """What the model wrote after the forced prefix (the whole response when there is none)."""
        return self.response[len(self.prefix) :] if self.response.startswith(self.prefix) else self.response


def resolve_template(tokenizer: PreTrainedTokenizerBase, wanted: str) -> str:
    """'chat' when asked for and the tokenizer has a chat template, else 'plain'."""
    if wanted not in ("chat", "plain"):
        raise HarmsweepError(f"alignment.template={wanted} is not one of chat, plain")
    return "chat" if wanted == "chat" and tokenizer.chat_template else "plain"


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, template: str) -> list[int]:
    """Token ids of the formatted prompt, ending where the assistant's response begins."""
    if template == "chat":
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(PLAIN_TEMPLATE.format(prompt=prompt), add_special_tokens=True)["input_ids"]


def response_ids(tokenizer: PreTrainedTokenizerBase, response: str) -> list[int]:
    return tokenizer(response, add_special_tokens=False)["input_ids"]


def encode_pairs(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[Pair], template: str, max_length: int | None
) -> Tensors:
    """Right-padded input_ids / attention_mask / labels, labels = -100 on prompt and padding.

    Responses longer than the room left after the prompt are cut at the end (``max_length=None``: never);
    a pair whose prompt leaves no room at all is an error, since silently dropping it would change the
    sample count.
    """
    return _encode(
        tokenizer,
        [(prompt_ids(tokenizer, p.prompt, template), response_ids(tokenizer, p.response)) for p in pairs],
        pairs,
        max_length,
    )


def btap_ids(tokenizer: PreTrainedTokenizerBase, pair: Pair, side: str, separator: str) -> tuple[list[int], list[int]]:
    """The authors' token ids (prompt, response): each part tokenised alone without special tokens (no BOS, no
    chat template). Harmful: tok(prompt + separator), tok(response); benign (their Alpaca branch): tok(prompt),
    tok("\n" + response), so the newline is a scored token."""

    def tok(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    if side == "benign":
        return tok(pair.prompt), tok("\n" + pair.response)
    if side != "harmful":
        raise ValueError(f"side={side!r} is not harmful or benign")
    return tok(pair.prompt + separator), tok(pair.response)


def encode_btap(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[Pair], side: str, separator: str, max_length: int | None
) -> Tensors:
    """``encode_pairs`` with the authors' tokenisation (``btap_ids``) in place of a template: calibration.format=btap."""
    return _encode(tokenizer, [btap_ids(tokenizer, p, side, separator) for p in pairs], pairs, max_length)


def _encode(
    tokenizer: PreTrainedTokenizerBase,
    ids: Sequence[tuple[list[int], list[int]]],
    pairs: Sequence[Pair],
    max_length: int | None,
) -> Tensors:
    """Right-padded tensors of (prompt ids, response ids) rows, cut to ``max_length`` when it is set: the response
    at its end. A prompt that leaves no room at all loses its start instead, down to what leaves
    ``min(len(response), max_length // 2)`` response tokens (the end of a prompt, next to the answer, matters
    most); such pairs are counted in one warning. Pairs that fit are encoded as they always were."""
    rows, cut = [], []
    for pair, (p, r) in zip(pairs, ids, strict=True):
        if not r:
            raise HarmsweepError(f"pair {pair.source_id} has no response tokens (its response is empty)")
        if max_length is not None:
            if len(p) >= max_length:
                keep = max_length - min(len(r), max(1, max_length // 2))
                p = p[len(p) - keep :] if keep > 0 else []
                cut.append(str(pair.source_id))
            r = r[: max_length - len(p)]
        rows.append((p, r))
    if cut:
        log.warning(
            "%d of %d pairs: the prompt fills calibration.max_length=%d, so it loses its start to leave room for the "
            "response (e.g. %s)", len(cut), len(rows), max_length, ", ".join(cut[:3]),
        )  # fmt: skip
    input_ids, attention = padded([p + r for p, r in rows], tokenizer.pad_token_id)
    labels = torch.full_like(input_ids, IGNORE)
    for i, (p, r) in enumerate(rows):
        labels[i, len(p) : len(p) + len(r)] = torch.tensor(r)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def attack_prompts(
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Record],
    template: str,
    prefill_tokens: int,
    *,
    prefixes: Sequence[Sequence[int]] | None = None,
    prompt_format: str = "harmsweep",
) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt ids to generate from, and the forced assistant prefix of each: the first k tokens of ``prefixes[i]``
    when given (a real answer, eval.generation.prefix=file), else of the record's target; k=0 forces none.

    The chat template (either format) and the plain template of ``prompt_format=harmsweep`` end with the prefix ids.
    ``prompt_format=btap`` with the plain template is the authors' raw text, tokenised with the tokenizer's default
    special tokens: ``Q: {prompt}\nA:`` unattacked, ``{prompt}\n{prefix text}`` prefilled.
    """
    if prompt_format not in PROMPT_FORMATS:
        raise HarmsweepError(f"eval.generation.prompt_format={prompt_format} is not one of {', '.join(PROMPT_FORMATS)}")
    if prefixes is not None and len(prefixes) != len(records):
        raise HarmsweepError(f"{len(prefixes)} prefixes for {len(records)} prompts")
    forced: list[list[int]] = []
    for i, rec in enumerate(records):
        if prefill_tokens <= 0:
            forced.append([])
        elif prefixes is not None:
            forced.append(list(prefixes[i])[:prefill_tokens])
        elif not rec.target:
            raise HarmsweepError(
                f"prefilling needs a target per prompt and {rec.source_id} has none; "
                "use calibration.harmful.responses=on_policy or a file of responses"
            )
        else:
            forced.append(response_ids(tokenizer, rec.target)[:prefill_tokens])
    prompts = [
        _attacked(tokenizer, r.prompt, template, pre, prompt_format) for r, pre in zip(records, forced, strict=True)
    ]
    return prompts, forced


def _attacked(tokenizer: PreTrainedTokenizerBase, prompt: str, template: str, prefix: list[int], fmt: str) -> list[int]:
    if template == "plain" and fmt == "btap":
        text = (
            f"{prompt}\n{tokenizer.decode(prefix, skip_special_tokens=True)}"
            if prefix
            else BTAP_PLAIN.format(prompt=prompt)
        )
        return list(tokenizer(text)["input_ids"])
    return prompt_ids(tokenizer, prompt, template) + prefix


def generate_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Record],
    template: str,
    *,
    prefill_tokens: int,
    sampling: Sampling,
    batch_size: int,
    desc: str,
    backend: str = "hf",
    engine: EngineInputs | None = None,
    prefixes: Sequence[Sequence[int]] | None = None,
    prompt_format: str = "harmsweep",
    keys: Sequence[str] | None = None,
) -> list[Pair]:
    """The model's own responses; with prefill_tokens > 0 the first k prefix tokens (``attack_prompts``) are forced
    first. Sampled answers are seeded per prompt by ``keys`` (default: the records' source ids; a record without one
    by its prompt ids), so an answer does not depend on its batch."""
    prompts, forced = attack_prompts(
        tokenizer, records, template, prefill_tokens, prefixes=prefixes, prompt_format=prompt_format
    )
    if sampling.do_sample and (keys is not None or sampling.keys is None):
        if keys is None:
            keys = [r.source_id or content_key(p) for r, p in zip(records, prompts, strict=True)]
        sampling = replace(sampling, keys=tuple(keys))
    continuations = generate(model, tokenizer, prompts, sampling, batch_size, desc, backend, engine)
    return [
        Pair(
            rec.prompt,
            tokenizer.decode(pre + cont, skip_special_tokens=True),
            rec.source_id,
            rec.category,
            tokenizer.decode(pre, skip_special_tokens=True) if pre else "",
        )
        for rec, pre, cont in zip(records, forced, continuations, strict=True)
    ]


def file_pairs(records: Sequence[Record], what: str) -> list[Pair]:
    """Pairs from records that carry their own responses (a dataset or a user file)."""
    missing = [r.source_id for r in records if not r.response]
    if missing:
        raise HarmsweepError(f"{what}: {len(missing)} records have no response (first: {missing[0]})")
    return [Pair(r.prompt, str(r.response), r.source_id, r.category) for r in records]


def save_sets(sets: Mapping[str, Tensors], pairs: Mapping[str, Sequence[Pair]], path: str | Path) -> None:
    """Tokenised sets in one safetensors file ('<set>.<field>'), texts beside it as JSONL."""
    path = Path(path)
    write_jsonl([{"set": s, **pair_row(p)} for s, ps in pairs.items() for p in ps], path.with_suffix(".jsonl"))
    flat = {f"{s}.{field}": t.contiguous() for s, ts in sets.items() for field, t in ts.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata={"sets": json.dumps(sorted(sets))})


def pair_row(pair: Pair) -> dict[str, Any]:
    """A pair as a JSON row; ``prefix`` only when there is one, so unprefilled rows read as they always did."""
    row = asdict(pair)
    if not row["prefix"]:
        del row["prefix"]
    return row


def load_sets(path: str | Path) -> dict[str, Tensors]:
    sets: dict[str, Tensors] = {}
    for key, tensor in load_file(str(path)).items():
        name, field = key.rsplit(".", 1)
        sets.setdefault(name, {})[field] = tensor
    return sets
