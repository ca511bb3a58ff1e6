"""The authors' (B-TAP) data layout: their pair files read as they are, where their code finds them, and the rows it uses.

Their files are read without harmsweep's cleaning (no de-duplication, no blank-dropping, no category filter): the
scored pairs must be theirs, row for row. A missing or empty cell, which would crash their code, is a one-line
DataError naming the file and the row. No torch and no ``datasets`` at import: config checks read headers only.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from harmsweep.data.records import Record
from harmsweep.data.sources import data_error

# Column pairs in order of preference: their align files hold the raw request and response in clean_*; prompt and
# response there are chat renderings (read only when the clean_* columns are absent, as in their Alpaca file).
PAIR_COLUMNS = (("clean_prompt", "clean_response"), ("prompt", "response"))
ALPACA_RAW = "alpaca_cleaned_no_safety_train_raw"  # their single model-independent benign file
SUFFIXES = (".csv", ".json", ".jsonl")


def btap_files(btap_data: str, prune_data: str, preserve_data: str, basename: str) -> dict[str, tuple[Path, str, bool]]:
    """side -> (file their code reads, the setting that names it, whether it is read like an align file):
    ``{prune_data}_{basename}.csv``, and ``{preserve_data}.csv`` for their Alpaca set (prompt/response, their
    Alpaca branch), else ``{preserve_data}_{basename}.csv`` (an align file, read and tokenised like the harmful one)."""
    root = Path(btap_data).expanduser()
    alpaca = preserve_data == ALPACA_RAW
    benign = f"{preserve_data}.csv" if alpaca else f"{preserve_data}_{basename}.csv"
    return {
        "harmful": (root / f"{prune_data}_{basename}.csv", f"calibration.prune_data={prune_data}", True),
        "benign": (root / benign, f"calibration.preserve_data={preserve_data}", not alpaca),
    }


def pair_columns(columns: Sequence[str], origin: str | Path, align: bool = True) -> tuple[str, str]:
    """The (prompt, response) columns read. ``align`` (harmful files, their align layout): clean_prompt/clean_response,
    else prompt/response; otherwise (their Alpaca branch) prompt/response. Every other column (their files also hold
    prompt, response, text) is never read."""
    have = list(columns)
    if not align:
        missing = [c for c in PAIR_COLUMNS[1] if c not in have]
        if missing:
            raise data_error(origin, f"needs columns prompt and response; the file has: {', '.join(have)}")
        return PAIR_COLUMNS[1]
    if "clean_prompt" in have or "clean_response" in have:
        missing = [c for c in PAIR_COLUMNS[0] if c not in have]
        if missing:
            present = next(c for c in PAIR_COLUMNS[0] if c in have)
            raise data_error(origin, f"has a {present} column but no {missing[0]} column")
        return PAIR_COLUMNS[0]
    if all(c in have for c in PAIR_COLUMNS[1]):
        return PAIR_COLUMNS[1]
    raise data_error(
        origin,
        f"needs columns clean_prompt and clean_response (or prompt and response); the file has: {', '.join(have)}",
    )


def header(path: Path) -> list[str]:
    """A pair file's columns, read without its rows (JSON lists: the first object's keys); an empty file, or a
    header without a row, is a DataError."""
    if path.suffix.lower() not in SUFFIXES:
        raise data_error(path, f"unsupported file type {path.suffix or '(none)'!r}; use .csv, .json or .jsonl")
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            if path.suffix.lower() == ".csv":
                rows = csv.reader(handle)
                first, second = next(rows, None), next(rows, None)
                if not first or not any(c.strip() for c in first):
                    raise data_error(path, "file is empty")
                if second is None:
                    raise data_error(path, "no rows (the file has a header but no data)")
                return [c for c in first if c]
            if path.suffix.lower() == ".jsonl":
                line = next((line for line in handle if line.strip()), None)
                item = json.loads(line) if line is not None else None
            else:
                text = handle.read()
                items = json.loads(text) if text.strip() else None
                if items is not None and not isinstance(items, list):
                    raise data_error(path, "expected a JSON list of objects")
                item = items[0] if items else None
    except (OSError, UnicodeDecodeError, csv.Error, json.JSONDecodeError) as exc:
        raise data_error(path, f"cannot read ({type(exc).__name__}: {exc})") from exc
    if item is None:
        raise data_error(path, "file is empty")
    if not isinstance(item, dict):
        raise data_error(path, f"the first item is a {type(item).__name__}, expected an object")
    return list(item)


def check_pair_file(path: Path, setting: str, align: bool = True) -> None:
    """What a config check can tell without reading rows: the file exists, is not empty, has the pair columns."""
    if not path.is_file():
        raise data_error(path, f"not found (the file {setting} names)")
    pair_columns(header(path), path, align)


def read_pairs(path: Path, align: bool = True) -> list[Record]:
    """Every row of a pair file, in file order, as Records (source_id ``<file stem>:<row>``), columns as
    ``pair_columns`` says; an empty or missing prompt or response cell is a DataError naming the row (0-based,
    header not counted)."""
    from harmsweep.data.files import read_file  # imports datasets

    table = read_file(path)
    prompt_col, response_col = pair_columns(table.column_names, path, align)
    records = []
    for i, (prompt, response) in enumerate(zip(table[prompt_col], table[response_col], strict=True)):
        for column, value in ((prompt_col, prompt), (response_col, response)):
            if not isinstance(value, str) or value == "":
                what = "is empty" if value in ("", None) else f"is not text ({type(value).__name__})"
                raise data_error(path, f"row {i}: the {column} cell {what}")
        records.append(Record(prompt=prompt, response=response, source_id=f"{path.stem}:{i}"))
    return records


def btap_rows(total: int, n: int, seed: int) -> tuple[list[int], list[int]]:
    """Their row choice as (used, rest): every row in file order when n >= total (rest empty), else the first n of
    ``numpy.random.default_rng(seed).permutation(total)`` (what ``Dataset.shuffle(seed).select(range(n))`` picks)
    and the rest of that permutation, in its order."""
    if n >= total:
        return list(range(total)), []
    order = [int(i) for i in np.random.default_rng(seed).permutation(total)]
    return order[:n], order[n:]


# Their model_to_chat: a base model is evaluated with the prompts and prefixes of an instruct model's validation file
# (Qwen2.5 base models keep their own). Names are hub basenames.
MODEL_TO_CHAT = {
    "Llama-3.1-8B": "Llama-3.1-8B-Instruct",
    "Mistral-7B-v0.3": "Mistral-7B-Instruct-v0.3",
    "Olmo-3-1025-7B": "Olmo-3-7B-Instruct-SFT",
}
BTAP_FILE = "btap"  # eval.harmful_file / eval.generation.prefix_file: their validation file, found under btap_data


def btap_valid_file(btap_data: str | None, basename: str, setting: str) -> Path:
    """``{btap_data}/advbench_align_anti_{chat model}_valid.csv``: their AdvBench validation prompts with a real
    harmful answer each (the prefilling attack's prefixes), for the model ``basename`` (a base model: its chat
    model's file, as their ``model_to_chat`` maps it)."""
    if not btap_data:
        raise data_error(None, f"{setting}=btap needs calibration.btap_data=DIR (their data folder)")
    chat = MODEL_TO_CHAT.get(basename, basename)
    return Path(btap_data).expanduser() / f"advbench_align_anti_{chat}_valid.csv"
