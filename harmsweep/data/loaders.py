"""Read the published prompt datasets from local files into `Record`s.

Experiments run on machines without internet, so every loader reads a local copy under the data root (layout in
`DEFAULT_PATHS`) and fails early with a one-line DataError that names the file and says how to fix it. Downloading
is opt-in (`download=True`). Cleaning (blank prompts, duplicates, category filter) happens in one place,
`_finalize`, so every dataset gets the same rules.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from harmsweep.data.hub import (
    ALPACA_SAFETY_SOURCE,
    HEXPHI_HOWTO,
    HUB_SOURCES,
    data_error,
    download_url,
    fetch_dataset,
)
from harmsweep.data.records import Record
from harmsweep.errors import DataError

log = logging.getLogger(__name__)

# name -> candidate paths under the data root; the first that exists is used, the last is where download=True saves.
DEFAULT_PATHS: dict[str, tuple[str, ...]] = {
    "advbench": ("advbench/harmful_behaviors.csv",),
    "strongreject": ("strongreject/strongreject_dataset.csv",),
    "strongreject_small": ("strongreject/strongreject_small_dataset.csv",),
    "harmbench": ("harmbench/harmbench_behaviors_text_test.csv",),
    "hexphi": ("hexphi",),
    "alpaca": ("alpaca/alpaca_data_1k.json", "alpaca/alpaca_data.json"),
    "alpaca_eval": ("alpaca/alpaca_eval.jsonl", "alpaca/alpaca_eval.json"),
    "wei2024_refusals": ("wei2024/SFT_aligned_llama2-7b-chat-hf_train_short.csv",),
    "custom": (),
}
DATASETS: tuple[str, ...] = tuple(DEFAULT_PATHS)

# HEx-PHI category number -> (slug used as Record.category, published name).
HEXPHI_CATEGORIES: dict[int, tuple[str, str]] = {
    1: ("illegal_activity", "Illegal Activity"),
    2: ("child_abuse_content", "Child Abuse Content"),
    3: ("hate_harass_violence", "Hate/Harass/Violence"),
    4: ("malware", "Malware"),
    5: ("physical_harm", "Physical Harm"),
    6: ("economic_harm", "Economic Harm"),
    7: ("fraud_deception", "Fraud/Deception"),
    8: ("adult_content", "Adult Content"),
    9: ("political_campaigning", "Political Campaigning"),
    10: ("privacy_violation_activity", "Privacy Violation Activity"),
    11: ("tailored_financial_advice", "Tailored Financial Advice"),
}
_HEXPHI_ALIASES: dict[str, str] = {
    alias.casefold(): slug
    for number, (slug, title) in HEXPHI_CATEGORIES.items()
    for alias in (str(number), f"category_{number}", slug, title)
}

SAFETY_FILTER_NAMES = ("alpaca_data_safety_only.json", "alpaca_data_safety_only.jsonl")
CUSTOM_FIELDS = ("prompt", "response", "category", "target", "id")
CUSTOM_DEFAULT_COLUMNS: dict[str, str] = {"prompt": "prompt", "response": "response", "category": "category"}


def load_records(
    name: str,
    root: str | Path | None,
    *,
    file: str | Path | None = None,
    categories: list[str] | None = None,
    columns: dict[str, str] | None = None,
    download: bool = False,
) -> list[Record]:
    """Load dataset `name` from `file` or its default place under `root` (falls back to $HARMSWEEP_DATA).

    Whitespace-only prompts are dropped and exact duplicates kept once; `categories` keeps only those categories
    (an empty list means no filter). `download=True` fetches a missing file from `HUB_SOURCES`; otherwise the
    network is never touched. Every problem raises a one-line DataError before anything is returned.
    """
    if name not in DEFAULT_PATHS:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    if columns is not None and name != "custom":
        raise DataError(f"columns= only applies to dataset 'custom', not {name!r}; remove it")
    if name == "custom" and file is None:
        raise DataError("dataset 'custom' needs file=PATH (.csv, .json or .jsonl) and optionally columns={field: col}")
    root_value = root if root not in (None, "") else os.environ.get("HARMSWEEP_DATA")
    root_dir = Path(root_value).expanduser() if root_value else None
    path = _locate(name, root_dir, file, download)
    if name == "custom":
        records = _load_custom(path, columns)
    elif name == "alpaca":
        records = _load_alpaca(path, root_dir, download)
    else:
        records = _PARSERS[name](path, name)
    return _finalize(records, path, name, categories)


def _locate(name: str, root: Path | None, file: str | Path | None, download: bool) -> Path:
    """Find the data file (or HEx-PHI folder), downloading it into the default place if asked to."""
    if file is not None:
        path = Path(file).expanduser()
        if not path.exists():
            raise data_error(path, f"{name} file not found; check the dataset's file setting (e.g. data.harmful.file)")
        return path
    if root is None:
        raise DataError("no data root: set data.root=DIR or HARMSWEEP_DATA")
    candidates = [root / rel for rel in DEFAULT_PATHS[name]]
    for path in candidates:  # HEx-PHI is a folder of category files, every other dataset one file
        if path.is_dir() and any(path.glob("category_*.csv")) if name == "hexphi" else path.is_file():
            return path
    if download:
        return fetch_dataset(name, candidates[-1])
    if name == "hexphi":
        raise data_error(candidates[0], f"no HEx-PHI category_N.csv files here; {HEXPHI_HOWTO}")
    raise data_error(
        candidates[0],
        f"{name} data not found; point data.root at the folder that holds {DEFAULT_PATHS[name][0]}, set its file "
        f"(e.g. data.harmful.file=PATH), or (with internet) set download=true to fetch it from {HUB_SOURCES[name]}",
    )


def _read_text(path: Path) -> str:
    """Read a whole UTF-8 file (BOM tolerated); missing, unreadable and empty files are DataErrors."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise data_error(path, f"not UTF-8 text (byte {exc.start})") from exc
    except OSError as exc:  # not found, a folder, no permission
        raise data_error(path, f"cannot read file ({exc.strerror})") from exc
    if not text.strip():
        raise data_error(path, "file is empty")
    return text


def _read_csv(path: Path, required: Iterable[str]) -> tuple[list[dict[str, str]], list[str]]:
    """Read a CSV with a header row; returns the rows and the header, after checking required columns exist."""
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    try:
        rows = list(reader)
    except csv.Error as exc:
        raise data_error(path, f"malformed CSV near line {reader.line_num} ({exc})") from exc
    header = [h for h in (reader.fieldnames or []) if h is not None]
    missing = [c for c in required if c not in header]
    if missing:
        raise data_error(path, f"missing column(s) {', '.join(missing)}; the header has: {', '.join(header)}")
    return rows, header


def _read_json_items(path: Path) -> list[dict[str, Any]]:
    """Read a JSON list of objects (.json) or one object per line (.jsonl)."""
    text = _read_text(path)
    try:
        if path.suffix.lower() == ".jsonl":
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise data_error(path, f"malformed JSON at line {exc.lineno} column {exc.colno} ({exc.msg})") from exc
    if not isinstance(items, list):
        raise data_error(path, f"expected a JSON list of objects, got {type(items).__name__}")
    bad = next((i for i, item in enumerate(items) if not isinstance(item, dict)), None)
    if bad is not None:
        raise data_error(path, f"item {bad} is a {type(items[bad]).__name__}, expected an object")
    return items


def _text(value: Any, path: Path, where: str) -> str | None:
    """A cell value as text (numbers are converted, missing is None); lists or objects are a DataError."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return str(value)
    raise data_error(path, f"{where} holds a {type(value).__name__}, expected text")


def _finalize(records: list[Record], path: Path, name: str, categories: list[str] | None) -> list[Record]:
    """Drop blank prompts and exact duplicates (first kept), then apply the category filter.

    A duplicate is the same prompt with the same response, so pair datasets (one prompt, several refusals) keep
    every pair; for prompt-only datasets this is plain prompt de-duplication.
    """
    kept: list[Record] = []
    seen: set[tuple[str, str | None]] = set()
    for record in records:
        key = (record.prompt, record.response)
        if record.prompt.strip() and key not in seen:
            seen.add(key)
            kept.append(record)
    if not kept:
        raise data_error(path, f"{name}: no usable rows (no non-blank prompts)")
    if len(kept) < len(records):
        log.info(
            "%s: dropped %d blank or duplicate rows of %d in %s", name, len(records) - len(kept), len(records), path
        )
    if isinstance(categories, str):  # `categories: malware` in a config means one category, not its letters
        categories = [categories]
    if not categories:
        return kept
    present = list(dict.fromkeys(r.category for r in kept if r.category is not None))
    if not present:
        raise data_error(path, f"dataset {name!r} has no categories, so categories={list(categories)} cannot apply")
    by_key = {c.casefold(): c for c in present}
    aliases = _HEXPHI_ALIASES if name == "hexphi" else {}
    chosen: set[str] = set()
    for wanted in categories:
        key = str(wanted).strip().casefold()
        key = aliases.get(key, key)
        if key not in by_key:
            raise data_error(path, f"unknown category {wanted!r} for {name}; available: {', '.join(present)}")
        chosen.add(by_key[key])
    return [r for r in kept if r.category in chosen]


def _load_advbench(path: Path, name: str) -> list[Record]:
    """AdvBench harmful_behaviors.csv: goal -> prompt, target -> affirmative target prefix."""
    rows, _ = _read_csv(path, ["goal", "target"])
    return [
        Record(row["goal"] or "", target=row["target"] or None, source_id=f"{name}:{i}") for i, row in enumerate(rows)
    ]


def _load_strongreject(path: Path, name: str) -> list[Record]:
    """StrongREJECT CSV (category, source, forbidden_prompt)."""
    rows, _ = _read_csv(path, ["category", "forbidden_prompt"])
    return [
        Record(prompt=row["forbidden_prompt"] or "", category=row["category"] or None, source_id=f"{name}:{i}")
        for i, row in enumerate(rows)
    ]


def _load_harmbench(path: Path, name: str) -> list[Record]:
    """HarmBench behaviors CSV; contextual behaviors get their context prepended as HarmBench's own prompts do."""
    rows, _ = _read_csv(path, ["Behavior", "SemanticCategory", "BehaviorID"])
    records = []
    for i, row in enumerate(rows):
        behavior, context = row["Behavior"] or "", (row.get("ContextString") or "").strip()
        prompt = f"{context}\n\n---\n\n{behavior}" if context and behavior.strip() else behavior
        source_id = f"{name}:{row['BehaviorID'] or i}"
        records.append(Record(prompt, category=row["SemanticCategory"] or None, source_id=source_id))
    return records


def _load_hexphi(directory: Path, name: str) -> list[Record]:
    """HEx-PHI folder of header-less category_N.csv files, one (possibly CSV-quoted) prompt per line."""
    if not directory.is_dir():
        raise data_error(directory, "HEx-PHI expects a folder holding category_1.csv ... category_11.csv")
    records: list[Record] = []
    found = [(n, directory / f"category_{n}.csv") for n in HEXPHI_CATEGORIES]
    found = [(n, path) for n, path in found if path.is_file()]
    if not found:
        raise data_error(directory, f"no HEx-PHI category_N.csv files here; {HEXPHI_HOWTO}")
    for number, path in found:
        try:
            rows = list(csv.reader(io.StringIO(_read_text(path), newline="")))
        except csv.Error as exc:
            raise data_error(path, f"malformed CSV ({exc})") from exc
        slug = HEXPHI_CATEGORIES[number][0]
        # An unquoted comma splits a line into several fields; joining restores the prompt.
        records += [
            Record(",".join(row), category=slug, source_id=f"{name}:{number}:{i}") for i, row in enumerate(rows)
        ]
    return records


def _strip_inst(text: str) -> str:
    """Remove a Llama-2 chat wrapper "[INST] ... [/INST]" and surrounding whitespace."""
    text = text.strip().removeprefix("<s>").strip().removeprefix("[INST]")
    return text.removesuffix("[/INST]").strip()


def _load_wei2024(path: Path, name: str) -> list[Record]:
    """Wei et al. 2024 safety-short CSV: Llama-2 chat prompts with refusal responses (several per prompt)."""
    rows, header = _read_csv(path, ["prompt", "response"])
    index = "" if "" in header else None  # the unnamed pandas index column, a stable row id
    return [
        Record(
            _strip_inst(row["prompt"] or ""),
            (row["response"] or "").strip() or None,
            source_id=f"{name}:{(row[index] if index is not None else '') or i}",
        )
        for i, row in enumerate(rows)
    ]


def _load_alpaca_eval(path: Path, name: str) -> list[Record]:
    """AlpacaEval instructions with reference outputs; the `dataset` field (its sub-source) becomes the category."""
    items = _read_json_items(path)
    _require_keys(items, ["instruction"], path)
    fields = ("instruction", "output", "dataset")
    rows = [[_text(item.get(f), path, f"item {i} {f}") for f in fields] for i, item in enumerate(items)]
    return [Record(p or "", response, category, f"{name}:{i}") for i, (p, response, category) in enumerate(rows)]


def _require_keys(items: list[dict[str, Any]], keys: Iterable[str], path: Path) -> None:
    """Fail if no item of a JSON file has one of the required keys (a wrong file, not a sparse one)."""
    present = set().union(*items) if items else set()
    missing = [k for k in keys if k not in present]
    if missing:
        raise data_error(path, f"missing key(s) {', '.join(missing)}; the items have: {', '.join(sorted(present))}")


def _load_alpaca(path: Path, root: Path | None, download: bool) -> list[Record]:
    """Alpaca instructions minus the safety-related items, so the set measures utility without refusals."""
    items = _read_json_items(path)
    _require_keys(items, ["instruction", "output"], path)
    places = [path.parent] + ([root / "alpaca"] if root is not None else [])
    filters = [p / n for p in places for n in SAFETY_FILTER_NAMES if (p / n).is_file()]
    if not filters and download and root is not None:
        filters = [download_url(ALPACA_SAFETY_SOURCE, root / "alpaca" / SAFETY_FILTER_NAMES[0])]
    unsafe: set[tuple[str, str]] = set()
    if filters:  # an Alpaca example is identified by its (instruction, input) pair
        listed = _read_json_items(filters[0])
        _require_keys(listed, ["instruction"], filters[0])
        unsafe = {(str(item.get("instruction") or ""), str(item.get("input") or "")) for item in listed}
    records, removed = [], 0
    for i, item in enumerate(items):
        instruction = _text(item.get("instruction"), path, f"item {i} instruction") or ""
        extra = _text(item.get("input"), path, f"item {i} input") or ""
        if (instruction, extra) in unsafe:
            removed += 1
            continue
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        response = _text(item.get("output"), path, f"item {i} output")
        records.append(Record(prompt, response, source_id=f"alpaca:{i}"))
    if filters:
        log.info("alpaca: removed %d of %d items listed as safety-related in %s", removed, len(items), filters[0])
    else:
        log.warning("alpaca: no %s next to %s, so safety-related items are NOT removed", SAFETY_FILTER_NAMES[0], path)
    if not records:
        raise data_error(path, "no usable rows: every item is listed in the safety filter")
    return records


def _load_custom(path: Path, columns: Mapping[str, str] | None) -> list[Record]:
    """A user file (.csv, .json list, .jsonl) with `columns` mapping Record fields (and `id`) to its column names."""
    unknown = sorted(set(columns or {}) - set(CUSTOM_FIELDS))
    if unknown:
        raise data_error(path, f"unknown field(s) {', '.join(unknown)} in columns; allowed: {', '.join(CUSTOM_FIELDS)}")
    mapping = {**CUSTOM_DEFAULT_COLUMNS, **(columns or {})}
    required = dict.fromkeys([mapping["prompt"], *(columns or {}).values()])  # named explicitly, so must exist
    suffix = path.suffix.lower()
    rows: list[dict[str, Any]]
    if suffix == ".csv":
        rows, header = _read_csv(path, required)
        available: set[str] = set(header)
    elif suffix in (".json", ".jsonl"):
        rows = _read_json_items(path)
        _require_keys(rows, required, path)
        available = set().union(*rows)
    else:
        raise data_error(path, f"unsupported file type {suffix or '(none)'!r}; use .csv, .json or .jsonl")
    used = {field: col for field, col in mapping.items() if col in available}
    records = []
    for i, row in enumerate(rows):
        values = {field: _text(row.get(col), path, f"row {i} column {col!r}") for field, col in used.items()}
        response, category, target = (values.get(f) or None for f in ("response", "category", "target"))
        source_id = f"{path.stem}:{values.get('id') or i}"
        records.append(Record(values.get("prompt") or "", response, category, source_id, target))
    return records


_PARSERS: dict[str, Callable[[Path, str], list[Record]]] = {
    "advbench": _load_advbench,
    "strongreject": _load_strongreject,
    "strongreject_small": _load_strongreject,
    "harmbench": _load_harmbench,
    "hexphi": _load_hexphi,
    "alpaca_eval": _load_alpaca_eval,
    "wei2024_refusals": _load_wei2024,
}
