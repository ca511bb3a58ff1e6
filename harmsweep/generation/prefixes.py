"""Prefilling from real harmful answers (eval.generation.prefix=file) and fixed evaluation prompt files.

The authors prefill with the first k tokens of a real answer, not an affirmative "Sure, here is": AdvBench's from
their ``advbench_align_anti_{model}_valid.csv`` (clean_prompt/clean_response, matched here by prompt), HEx-PHI's
from ``Harmful-HEx-PHI.jsonl`` (one [user, assistant] pair a line, line i answering line i of HEx-PHI.jsonl, so
matched by the line a record came from: its source id ``hexphi:<i>``). A prompt without an answer is an error
before any generation: a silent fallback would change the attack.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from harmsweep.data.btap import pair_columns
from harmsweep.data.records import Record, norm_prompt
from harmsweep.data.sources import data_error
from harmsweep.errors import HarmsweepError

HEXPHI_ID = re.compile(r"hexphi:(\d+)")  # read_hexphi_jsonl's id: the record's 0-based line in HEx-PHI.jsonl
PROMPT_COLUMNS = ("clean_prompt", "prompt")  # a prompt CSV's prompt column, in order of preference


def read_prefix_answers(path: str | Path, records: Sequence[Record]) -> list[str]:
    """The real answer for each record, in the records' order: from a CSV by prompt (a record read from this very
    CSV, source id ``<stem>:<row>``, by its row), from a JSONL of [user, assistant] pairs by HEx-PHI line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise data_error(path, "prefix file not found (eval.generation.prefix_file)")
    if path.suffix.lower() == ".csv":
        return _csv_answers(path, records)
    if path.suffix.lower() == ".jsonl":
        return _jsonl_answers(path, records)
    raise data_error(path, f"unsupported prefix file type {path.suffix or '(none)'!r}; use .csv or .jsonl")


def _csv_answers(path: Path, records: Sequence[Record]) -> list[str]:
    from harmsweep.data.files import read_file  # imports datasets

    table = read_file(path)
    prompt_col, response_col = pair_columns(table.column_names, path)
    rows = list(zip(table[prompt_col], table[response_col], strict=True))
    exact: dict[str, int] = {}
    loose: dict[str, int] = {}
    for i, (prompt, _) in enumerate(rows):
        if isinstance(prompt, str):
            exact.setdefault(prompt.strip(), i)
            loose.setdefault(norm_prompt(prompt), i)
    answers = []
    for rec in records:
        stem, _, row = rec.source_id.rpartition(":")
        if stem == path.stem and row.isdigit() and int(row) < len(rows):
            i: int | None = int(row)
        else:
            i = exact.get(rec.prompt.strip(), loose.get(norm_prompt(rec.prompt)))
        if i is None:
            raise HarmsweepError(f"no answer for prompt {_short(rec.prompt)} ({rec.source_id}) in {path}")
        answers.append(_answer(rows[i][1], path, f"row {i}: the {response_col} cell"))
    return answers


def _jsonl_answers(path: Path, records: Sequence[Record]) -> list[str]:
    from harmsweep.data.files import read_text

    lines = [line for line in read_text(path).splitlines() if line.strip()]
    answers = []
    for rec in records:
        found = HEXPHI_ID.fullmatch(rec.source_id)
        if found is None:
            raise HarmsweepError(
                f"{path} answers HEx-PHI.jsonl lines, and record {rec.source_id} ({_short(rec.prompt)}) is not one "
                "(use data.harmful=hexphi with file=.../HEx-PHI.jsonl, or a CSV prefix file)"
            )
        line = int(found.group(1))
        if line >= len(lines):
            raise HarmsweepError(
                f"no answer for record {rec.source_id} ({_short(rec.prompt)}) in {path}: it has {len(lines)} lines"
            )
        answers.append(_assistant(lines[line], path, line))
    return answers


def _assistant(line: str, path: Path, index: int) -> str:
    """The assistant turn of one JSONL line: ``[user, assistant]`` or ``{"messages": [...]}``."""
    where = f"line {index + 1}"
    try:
        item: Any = json.loads(line)
    except json.JSONDecodeError as exc:
        raise data_error(path, f"{where}: malformed JSON ({exc.msg})") from exc
    messages = item.get("messages") if isinstance(item, dict) else item
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise data_error(path, f'{where}: expected a list of {{role, content}} messages or {{"messages": [...]}}')
    said = [m.get("content") for m in messages if m.get("role") == "assistant"]
    if not said:
        raise data_error(path, f"{where}: no assistant message")
    return _answer(said[-1], path, f"{where}: the assistant content")


def _answer(value: Any, path: Path, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise data_error(path, f"{what} is empty" if value in ("", None) else f"{what} is not text")
    return value


def _short(prompt: str, width: int = 60) -> str:
    text = " ".join(prompt.split())
    return repr(text if len(text) <= width else text[: width - 3] + "...")


def file_prefix_ids(tokenizer: PreTrainedTokenizerBase, answer: str, k: int) -> list[int]:
    """The forced prefix: the first k tokens of the answer in the evaluated model's tokenizer, no special tokens."""
    return list(tokenizer(answer, add_special_tokens=False)["input_ids"])[:k]


def prefix_text(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    """A prefix's text as the authors use it (their prompt for base models, the judged ``prefix|||...``)."""
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def read_prompt_file(path: str | Path) -> list[Record]:
    """Fixed evaluation prompts (eval.harmful_file): a .txt of one prompt a line (stripped, blank lines skipped;
    their advbench_valid.txt), or a CSV with a clean_prompt (else prompt) column (their _valid.csv; cells as
    written), whose clean_response / response is kept as the record's response. Source ids ``<stem>:<row>``
    (0-based line or data row), all rows in file order."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise data_error(path, "prompt file not found (eval.harmful_file)")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        from harmsweep.data.files import read_text

        lines = read_text(path).splitlines()
        return [Record(prompt=t.strip(), source_id=f"{path.stem}:{i}") for i, t in enumerate(lines) if t.strip()]
    if suffix != ".csv":
        raise data_error(path, f"unsupported prompt file type {suffix or '(none)'!r}; use .txt or .csv")
    from harmsweep.data.files import read_file

    table = read_file(path)
    columns = table.column_names
    prompt_col = next((c for c in PROMPT_COLUMNS if c in columns), None)
    if prompt_col is None:
        raise data_error(path, f"needs a clean_prompt or prompt column; the file has: {', '.join(columns)}")
    response_col = {"clean_prompt": "clean_response", "prompt": "response"}[prompt_col]
    if response_col in columns:
        prompt_col, response_col = pair_columns(columns, path)
    responses = table[response_col] if response_col in columns else [None] * len(table)
    records = []
    for i, (prompt, response) in enumerate(zip(table[prompt_col], responses, strict=True)):
        if not isinstance(prompt, str) or not prompt.strip():
            raise data_error(path, f"row {i}: the {prompt_col} cell is empty")
        records.append(Record(prompt=prompt, response=response or None, source_id=f"{path.stem}:{i}"))
    return records
