"""TriviaQA as the paper's authors measure it: does pruning harmful weights cost factual recall?

Their protocol (btap_reference.md 6.8): the unfiltered web dev questions, shuffled with ``random.Random(42)``,
the first 1,000; one sampled answer per question (chat models: chat template, 100 new tokens; base models:
``Q: {question}\\nA:``, 50 new tokens, first line kept); correct when any alias, lower-cased, is a substring of the
lower-cased answer. Accuracy is the mean of the per-item 0/1 values, which are also the bootstrap's items.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from harmsweep.errors import DataError, HarmsweepError
from harmsweep.evaluation.spec import TRIVIAQA_TOKENS
from harmsweep.generation.hf import generate
from harmsweep.generation.sampling import EngineInputs, Sampling

# The hub copy of their file: "unfiltered.nocontext" validation is built from unfiltered-web-dev.json alone, in file
# order (11,313 questions, no evidence documents to download); "rc.nocontext" validation is a different set (the
# verified web + wikipedia dev files). The hub strips whitespace around questions and aliases; their file does not.
HUB = ("mandarjoshi/trivia_qa", "unfiltered.nocontext", "validation")
TEMPLATES = ("chat", "plain")
MAX_NEW_TOKENS = TRIVIAQA_TOKENS  # theirs, when eval.triviaqa.max_new_tokens is null


@dataclass(frozen=True)
class TriviaItem:
    question: str
    aliases: tuple[str, ...]
    id: str


def read_triviaqa(file: str | Path | None, n: int | None, seed: int, download: bool) -> list[TriviaItem]:
    """The first ``n`` questions after a ``random.Random(seed)`` shuffle of the whole dev set (theirs: seed 42).

    ``file``: their ``unfiltered-web-dev.json`` layout ({"Data": [{"Question", "QuestionId", "Answer": {"Aliases"}}]});
    null: the hub's copy (HUB), only with ``data.download=true`` or a filled offline cache. ``n`` null: every question.
    """
    if n is not None and int(n) < 1:
        raise HarmsweepError(f"eval.triviaqa.n={n} must be at least 1 (or null for every question)")
    if file is not None:
        items, source = _read_file(Path(file).expanduser()), str(file)
    else:
        items, source = _read_hub(download), f"{HUB[0]} ({HUB[1]}, {HUB[2]})"
    if n is not None and int(n) > len(items):
        raise DataError(f"{source}: eval.triviaqa.n={n} but it has only {len(items)} questions; lower eval.triviaqa.n")
    random.Random(seed).shuffle(items)
    return items if n is None else items[: int(n)]


def _read_file(path: Path) -> list[TriviaItem]:
    if not path.is_file():
        raise DataError(f"{path}: eval.triviaqa.file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: eval.triviaqa.file is not JSON ({type(exc).__name__}: {exc})") from exc
    rows = data.get("Data") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows:
        raise DataError(f'{path}: expected TriviaQA\'s layout, a non-empty top-level "Data" list')
    items = []
    for i, row in enumerate(rows):
        answer = row.get("Answer") if isinstance(row, dict) else None
        aliases = answer.get("Aliases") if isinstance(answer, dict) else None
        question = row.get("Question") if isinstance(row, dict) else None
        if (
            not isinstance(question, str)
            or not isinstance(aliases, list)
            or not all(isinstance(a, str) for a in aliases)
        ):
            raise DataError(f'{path}: Data[{i}] needs a "Question" string and "Answer": {{"Aliases": [strings]}}')
        items.append(TriviaItem(question, tuple(aliases), str(row.get("QuestionId", i))))
    return items


def _read_hub(download: bool) -> list[TriviaItem]:
    from harmsweep.data.hub import offline

    repo, config, split = HUB
    if not (download or offline()):
        raise DataError(
            f"{repo} ({config}) is not local: set eval.triviaqa.file=PATH (their unfiltered-web-dev.json) "
            "or data.download=true"
        )
    import datasets

    from harmsweep.data.files import quiet_datasets

    try:
        with quiet_datasets():
            rows = datasets.load_dataset(repo, config, split=split)
            return [TriviaItem(r["question"], tuple(r["answer"]["aliases"]), str(r["question_id"])) for r in rows]
    except Exception as exc:  # offline and not cached, HTTP, auth: one line either way
        reason = (str(exc).splitlines() or [""])[0]
        raise DataError(
            f"{repo} ({config}): could not load ({type(exc).__name__}: {reason}); set eval.triviaqa.file=PATH"
        ) from exc


def triviaqa_prompt_ids(tokenizer: PreTrainedTokenizerBase, question: str, template: str) -> list[int]:
    """chat: the user turn with the generation prompt (template's own special tokens only); plain: their
    ``Q: {question}\\nA:`` with the tokenizer's special tokens (BOS)."""
    _check_template(template)
    if template == "chat":
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(f"Q: {question}\nA:", add_special_tokens=True)["input_ids"]


def extract_answer(text: str, template: str) -> str:
    """Their cut of the decoded continuation: chat, what follows the first "assistant" (all of it when absent),
    stripped; plain, the first line after stripping."""
    _check_template(template)
    if template == "chat":
        return text.split("assistant", 1)[-1].strip()
    return text.strip().split("\n")[0]


def is_correct(answer: str, aliases: Sequence[str]) -> bool:
    """Their rule: any alias, lower-cased, is a substring of the lower-cased answer."""
    low = answer.lower()
    return any(alias.lower() in low for alias in aliases)


def max_new_tokens(template: str, configured: int | None) -> int:
    """eval.triviaqa.max_new_tokens, or theirs (chat 100, base 50) when null."""
    _check_template(template)
    return MAX_NEW_TOKENS[template] if configured is None else int(configured)


def triviaqa(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[TriviaItem],
    template: str,
    sampling: Sampling,
    batch_size: int,
    *,
    backend: str = "hf",
    engine: EngineInputs | None = None,
) -> tuple[float, list[dict[str, Any]]]:
    """Accuracy and one row per item (id, question, answer as judged, correct); ``sampling`` is the caller's (theirs:
    sampled with the model's generation config, max_new_tokens from ``max_new_tokens``)."""
    if not items:
        raise HarmsweepError("TriviaQA needs at least one question")
    prompts = [triviaqa_prompt_ids(tokenizer, item.question, template) for item in items]
    continuations = generate(
        model, tokenizer, prompts, sampling, batch_size, desc="triviaqa", backend=backend, engine=engine
    )
    rows = []
    for item, ids in zip(items, continuations, strict=True):
        text = tokenizer.decode(ids, skip_special_tokens=template == "chat")  # theirs: special tokens kept for base
        answer = extract_answer(text, template)
        rows.append(
            {"id": item.id, "question": item.question, "answer": answer, "correct": is_correct(answer, item.aliases)}
        )
    return sum(r["correct"] for r in rows) / len(rows), rows


def _check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise HarmsweepError(f"TriviaQA template={template} is not one of {', '.join(TEMPLATES)}")
