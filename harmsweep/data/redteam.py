"""Harmful (prompt, response) pairs for the fine-tuning attack: the authors' ``red_teaming_prompts.csv`` or a pair file.

Their file holds ``text`` (the request), ``rejected_response`` (a compliant, harmful answer) and ``harmful``; their
attack trains on the rows with ``harmful == 1``. A plain CSV/JSONL of ``prompt``/``response`` is read the same way
(filtered on ``harmful`` too when it has that column). Rows are theirs as written: no de-duplication, no cleaning.
A used row with an empty cell is a one-line DataError naming the file and the row, since silently dropping it would
change what is trained on. No torch and no ``datasets`` at import: config checks read the header only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harmsweep.data.btap import btap_rows, header
from harmsweep.data.records import Record
from harmsweep.data.sources import data_error

REDTEAM_COLUMNS = ("text", "rejected_response")  # their red_teaming_prompts.csv: request, harmful answer
PAIR_COLUMNS = ("prompt", "response")
HARMFUL = "harmful"
_YES = {"1", "1.0", "true"}
_NO = {"0", "0.0", "false"}


def harmful_columns(columns: list[str], origin: str | Path) -> tuple[str, str, bool]:
    """(prompt column, response column, whether rows are filtered on ``harmful``) for a file's columns."""
    if all(c in columns for c in REDTEAM_COLUMNS):
        if HARMFUL not in columns:
            raise data_error(origin, "has text and rejected_response but no harmful column (their red-teaming layout)")
        return REDTEAM_COLUMNS[0], REDTEAM_COLUMNS[1], True
    if all(c in columns for c in PAIR_COLUMNS):
        return PAIR_COLUMNS[0], PAIR_COLUMNS[1], HARMFUL in columns
    raise data_error(
        origin,
        "needs columns text, rejected_response, harmful (their red_teaming_prompts.csv) or prompt, response; "
        f"the file has: {', '.join(columns) or '(none)'}",
    )


def check_harmful_file(path: str | Path) -> None:
    """What a config check can tell before any work: the file exists, is not empty and has the pair columns."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise data_error(path, "not found (the file attack.finetune.file names)")
    harmful_columns(header(path), path)


def is_harmful(value: Any, origin: str | Path, row: int) -> bool:
    """Their ``harmful == 1`` for a cell read as text (CSV) or typed (JSON): 1, "1", 1.0, True; 0-like is False;
    anything else (empty, "yes") is a DataError, as the file's intent is then unclear."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        if value in (0, 1):
            return value == 1
    elif isinstance(value, str):
        text = value.strip().lower()
        if text in _YES or text in _NO:
            return text in _YES
    shown = "empty" if value in ("", None) else repr(value)
    raise data_error(origin, f"row {row}: the harmful cell is {shown}; expected 1 or 0")


def read_harmful_pairs(path: str | Path, n: int | None, seed: int) -> list[Record]:
    """The harmful pairs the attack trains on, as Records (source_id ``<file stem>:<row>``, rows 0-based without the
    header). ``n`` None: every harmful row in file order; else their draw (``btap_rows``): every harmful row in file
    order when n >= their count, otherwise the first n of ``numpy.random.default_rng(seed).permutation`` of the
    harmful rows (HF ``Dataset.filter`` then ``shuffle(seed).select(range(n))``)."""
    from harmsweep.data.files import read_file  # imports datasets

    path = Path(path).expanduser()
    if n is not None and int(n) < 1:
        raise data_error(path, f"n={n} rows asked for; must be at least 1 (or null for every harmful row)")
    table = read_file(path)
    prompt_col, response_col, filtered = harmful_columns(list(table.column_names), path)
    flags = table[HARMFUL] if filtered else [True] * table.num_rows
    rows = [i for i, flag in enumerate(flags) if is_harmful(flag, path, i)]
    if not rows:
        raise data_error(path, f"no row has harmful == 1 (of {table.num_rows} rows)")
    if n is not None:
        used, _ = btap_rows(len(rows), int(n), seed)
        rows = [rows[i] for i in used]
    prompts, responses = table[prompt_col], table[response_col]
    records = []
    for i in rows:
        for column, value in ((prompt_col, prompts[i]), (response_col, responses[i])):
            if not isinstance(value, str) or not value.strip():
                blank = value is None or not str(value).strip()
                what = "is empty" if blank else f"is not text ({type(value).__name__})"
                raise data_error(path, f"row {i}: the {column} cell {what}")
        records.append(Record(prompt=prompts[i], response=responses[i], source_id=f"{path.stem}:{i}"))
    return records
