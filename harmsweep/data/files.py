"""Read local data files (csv, json, jsonl, parquet, a HEx-PHI folder) into `datasets.Dataset`s.

Every file goes through `datasets.load_dataset(<builder>, data_files=...)`, the same layer the hub path uses, so a
local copy and a hub copy give identical tables. Reading happens in a throwaway cache folder held in memory: local
files are small, and concurrent sweep jobs then never contend for (or pollute) the shared HF datasets cache.
Cheap checks run first (readable, UTF-8, not empty, required columns) so the common mistakes get a precise one-line
DataError instead of a builder traceback.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import datasets

from harmsweep.data.sources import HEXPHI_CATEGORIES, HEXPHI_HOWTO, data_error

BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# Cells stay text exactly as written: no "NA" -> NaN, no "007" -> 7, a BOM is dropped.
_CSV_TEXT = {"na_filter": False, "keep_default_na": False, "encoding": "utf-8-sig"}
_NO_SEP = "\x1f"  # HEx-PHI lines are whole prompts: a separator that never occurs keeps unquoted commas in


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """Silence datasets' progress bars and its own error logging (we raise a one-line DataError instead)."""
    bars = datasets.utils.logging.is_progress_bar_enabled()
    logger = logging.getLogger("datasets")
    level = logger.level
    datasets.disable_progress_bars()
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def _root_cause(exc: BaseException) -> str:
    """The innermost message of a builder error (DatasetGenerationError wraps the parser's)."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return f"{type(exc).__name__}: {exc}"


def build(builder: str, data_files: str | list[str] | dict[str, str], **kwargs: Any) -> datasets.DatasetDict:
    """`load_dataset(builder, data_files=...)` into memory, through a temporary cache folder."""
    with tempfile.TemporaryDirectory(prefix="harmsweep-ds-") as cache, quiet_datasets():
        return datasets.load_dataset(builder, data_files=data_files, cache_dir=cache, keep_in_memory=True, **kwargs)


def read_text(path: Path) -> str:
    """Read a whole UTF-8 text file (BOM tolerated); unreadable, non-UTF-8 and empty files are DataErrors."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise data_error(path, f"not UTF-8 text (byte {exc.start})") from exc
    except OSError as exc:  # not found, a folder, no permission
        raise data_error(path, f"cannot read file ({exc.strerror})") from exc
    if not text.strip():
        raise data_error(path, "file is empty")
    return text


def require(columns: Iterable[str], present: Iterable[str], origin: str | Path, what: str = "column") -> None:
    """Fail when named columns are absent (a wrong file or a wrong column mapping)."""
    have = list(present)
    missing = [c for c in dict.fromkeys(columns) if c not in have]
    if missing:
        raise data_error(origin, f"missing {what}(s) {', '.join(missing)}; the file has: {', '.join(have)}")


def read_file(path: Path, required: Iterable[str] = ()) -> datasets.Dataset:
    """One local file as a Dataset (its columns as in the file), after checking `required` columns exist."""
    suffix = path.suffix.lower()
    if suffix not in BUILDERS:
        raise data_error(path, f"unsupported file type {suffix or '(none)'!r}; use .csv, .json, .jsonl or .parquet")
    if not path.is_file():
        raise data_error(path, "not a file")
    kwargs: dict[str, Any] = {}
    text = read_text(path) if suffix != ".parquet" else ""
    if suffix == ".csv":
        try:
            header = next(csv.reader(io.StringIO(text, newline="")))
        except csv.Error as exc:
            raise data_error(path, f"malformed CSV header ({exc})") from exc
        require(required, [h for h in header if h], path)
        kwargs = {**_CSV_TEXT, "converters": dict.fromkeys(range(len(header)), str)}
    elif suffix == ".json" and not text.lstrip().startswith("["):
        raise data_error(path, "expected a JSON list of objects")
    try:
        table = build(BUILDERS[suffix], str(path), split="train", **kwargs)
    except ValueError as exc:
        if "corresponds to no data" not in str(exc):
            raise _unreadable(path, suffix, text, exc) from exc
        raise data_error(path, "no usable rows (the file has a header but no data)") from exc
    except Exception as exc:  # parser errors surface as DatasetGenerationError from pandas/pyarrow
        raise _unreadable(path, suffix, text, exc) from exc
    if suffix != ".csv":
        require(required, table.column_names, path, "key" if suffix != ".parquet" else "column")
    return table


def _unreadable(path: Path, suffix: str, text: str, exc: BaseException) -> Exception:
    """The clearest one-line error for a file the builder could not read; for JSON, re-parse to locate the fault."""
    if suffix in (".json", ".jsonl"):
        try:
            items = (
                [json.loads(line) for line in text.splitlines() if line.strip()]
                if suffix == ".jsonl"
                else [*json.loads(text)]
            )
        except json.JSONDecodeError as error:
            return data_error(path, f"malformed JSON at line {error.lineno} column {error.colno} ({error.msg})")
        bad = next((i for i, item in enumerate(items) if not isinstance(item, dict)), None)
        if bad is not None:
            return data_error(path, f"item {bad} is a {type(items[bad]).__name__}, expected an object")
        return data_error(path, f"cannot read JSON rows ({_root_cause(exc)})")
    kind = "CSV" if suffix == ".csv" else "parquet"
    return data_error(path, f"malformed {kind} ({_root_cause(exc)})")


def read_hexphi_folder(directory: Path, name: str = "hexphi") -> datasets.Dataset:
    """A HEx-PHI folder of header-less category_N.csv files (one prompt per line) as prompt/category/source_id.

    This is how gated HEx-PHI is used: the user's own licensed copy, or the hub files fetched into the HF cache.
    """
    if not directory.is_dir():
        raise data_error(
            directory,
            "HEx-PHI expects a folder of category_1.csv ... category_11.csv, or a .jsonl file (instruction, category)",
        )
    found = {n: directory / f"category_{n}.csv" for n in HEXPHI_CATEGORIES}
    found = {n: path for n, path in found.items() if path.is_file()}
    if not found:
        raise data_error(directory, f"no HEx-PHI category_N.csv files here; {HEXPHI_HOWTO}")
    for path in found.values():
        read_text(path)
    files = {f"category_{n}": str(path) for n, path in found.items()}
    options = {**_CSV_TEXT, "header": None, "names": ["prompt"], "sep": _NO_SEP, "converters": {0: str}}
    try:
        parts = build("csv", files, **options)
    except Exception as exc:
        raise data_error(directory, f"malformed HEx-PHI CSV ({_root_cause(exc)})") from exc
    columns: dict[str, list[str]] = {"prompt": [], "category": [], "source_id": []}
    for number in found:
        prompts = list(parts[f"category_{number}"]["prompt"])
        columns["prompt"] += prompts
        columns["category"] += [HEXPHI_CATEGORIES[number][0]] * len(prompts)
        columns["source_id"] += [f"{name}:{number}:{i}" for i in range(len(prompts))]
    return datasets.Dataset.from_dict(columns)


def read_hexphi_jsonl(path: Path, name: str = "hexphi") -> datasets.Dataset:
    """The B-TAP authors' HEx-PHI.jsonl (one object a line: instruction, category) as prompt/category/source_id.

    Categories stay as written in the file (the loader maps them to harmsweep's slugs); rows and order are kept and
    source id `hexphi:i` is the i-th object, the index their Harmful-HEx-PHI.jsonl is aligned by.
    """
    table = read_file(path, ["instruction", "category"])
    columns: dict[str, list[str]] = {"prompt": [], "category": [], "source_id": []}
    for i, row in enumerate(table.select_columns(["instruction", "category"]).to_list()):
        for key, value in row.items():
            if not isinstance(value, str):
                raise data_error(path, f"line {i + 1}: {key} is a {type(value).__name__}, expected text")
        columns["prompt"].append(row["instruction"])
        columns["category"].append(row["category"].strip())
        columns["source_id"].append(f"{name}:{i}")
    return datasets.Dataset.from_dict(columns)


def read_prompt_list(path: Path) -> list[str]:
    """A plain text file of one prompt a line (the authors' hex-phi_{C}_not_{M}.txt), stripped, blanks skipped."""
    if not path.is_file():
        raise data_error(path, "prompt list not found (expected hex-phi_{category}_not_{minus}.txt here)")
    return [line.strip() for line in read_text(path).splitlines() if line.strip()]
