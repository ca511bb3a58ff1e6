"""Load the published prompt datasets into `Record`s through Hugging Face `datasets`.

Each dataset resolves in one order: the file the user names (data.*.file), the copy under the data root (layout in
`DEFAULT_PATHS`), then, when allowed, its pinned hub source (`hub.py`). Whatever the origin, the table is mapped to
one canonical Dataset (prompt, response, category, source_id, target); cleaning and the category filter run on that
Dataset (`_finalize`), so every dataset gets the same rules. Every problem is a one-line DataError.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets

from harmsweep.data import hub
from harmsweep.data.files import read_file, read_hexphi_folder, read_hexphi_jsonl, read_prompt_list, require
from harmsweep.data.records import Record
from harmsweep.data.sources import (
    ALPACA_SAFETY_SOURCE,
    DATASETS,
    DEFAULT_PATHS,
    HEXPHI_CATEGORIES,
    HEXPHI_HOWTO,
    HUB_SOURCES,
    data_error,
    where_to_get,
)
from harmsweep.data.spec import CHOSEN_FIVE, DatasetRef
from harmsweep.errors import DataError

log = logging.getLogger(__name__)

FIELDS = ("prompt", "response", "category", "source_id", "target")
FEATURES = datasets.Features({f: datasets.Value("string") for f in FIELDS})
_HEXPHI_ALIASES: dict[str, str] = {
    alias.casefold(): slug
    for number, (slug, title) in HEXPHI_CATEGORIES.items()
    for alias in (str(number), f"category_{number}", slug, title)
} | {"privacy_violation": "privacy_violation_activity"}  # the B-TAP authors' HEx-PHI.jsonl name
SAFETY_FILTER_NAMES = ("alpaca_data_safety_only.json", "alpaca_data_safety_only.jsonl")
CUSTOM_FIELDS = ("prompt", "response", "category", "target", "id")
CUSTOM_DEFAULT_COLUMNS: dict[str, str] = {"prompt": "prompt", "response": "response", "category": "category"}
# Columns each dataset needs, named as in its published file (the hub loader renames to these).
REQUIRED: dict[str, list[str]] = {
    "advbench": ["goal", "target"],
    "strongreject": ["category", "forbidden_prompt"],
    "strongreject_small": ["category", "forbidden_prompt"],
    "harmbench": ["Behavior", "SemanticCategory"],
    "alpaca": ["instruction", "output"],
    "alpaca_eval": ["instruction"],
    "wei2024_refusals": ["prompt", "response"],
}


def load_records(
    name: str,
    root: str | Path | None,
    *,
    file: str | Path | None = None,
    categories: list[str] | None = None,
    columns: dict[str, str] | None = None,
    download: bool = False,
    minus_category: str | None = None,
) -> list[Record]:
    """Load dataset `name` as Records; see `load_table` for the arguments."""
    table = load_table(
        name, root, file=file, categories=categories, columns=columns, download=download, minus_category=minus_category
    )
    return [Record(**row) for row in table.to_list()]


def load_table(
    name: str,
    root: str | Path | None,
    *,
    file: str | Path | None = None,
    categories: list[str] | None = None,
    columns: dict[str, str] | None = None,
    download: bool = False,
    minus_category: str | None = None,
) -> datasets.Dataset:
    """Dataset `name` as a canonical Dataset, from `file`, its place under `root` ($HARMSWEEP_DATA), or the hub.

    Whitespace-only prompts are dropped and exact duplicates kept once; `categories` keeps only those categories
    (empty means no filter). The hub is used only for a dataset missing locally, and only with `download=True` or in
    offline mode (then from the HF caches alone). HEx-PHI also reads the B-TAP authors' HEx-PHI.jsonl (every row
    kept, in file order), takes `chosen_five`, and `minus_category` (see `_minus`).
    """
    DatasetRef(name=name, categories=categories, minus_category=minus_category).validate()
    if name not in DEFAULT_PATHS:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    if columns is not None and name != "custom":
        raise DataError(f"columns= only applies to dataset 'custom', not {name!r}; remove it")
    if name == "custom" and file is None:
        raise DataError(
            "dataset 'custom' needs file=PATH (.csv, .json, .jsonl or .parquet) and optionally columns={field: col}"
        )
    root_value = root if root not in (None, "") else os.environ.get("HARMSWEEP_DATA")
    root_dir = Path(root_value).expanduser() if root_value else None
    found: Path | datasets.Dataset = _locate(name, root_dir, file, download)
    origin: str | Path = found if isinstance(found, Path) else HUB_SOURCES[name].ref
    if name == "custom":
        table = _custom(read_file(found, ()), found, columns)  # type: ignore[arg-type]
    elif name == "hexphi":
        if not isinstance(found, Path):  # the hub path fetches HEx-PHI's files, never a table
            raise data_error(origin, "HEx-PHI is read from a folder of category_N.csv files")
        jsonl = found.is_file() and found.suffix.lower() == ".jsonl"
        folder = read_hexphi_jsonl(found) if jsonl else read_hexphi_folder(found)
        written = list(folder["category"])  # the authors' names name their not-list files
        slugs = [_HEXPHI_ALIASES.get(c.casefold(), c) for c in written]
        table = _canonical(prompt=list(folder["prompt"]), category=slugs, source_id=list(folder["source_id"]))
        table = _finalize(table, origin, name, categories, dedupe=not jsonl)
        if minus_category is None:
            return table
        names = dict(zip(slugs, written, strict=True))
        lists = found if found.is_dir() else found.parent
        return _minus(table, lists, names, str(table[0]["category"]), minus_category)
    else:
        raw = read_file(found, REQUIRED[name]) if isinstance(found, Path) else found
        require(REQUIRED[name], raw.column_names, origin)
        if name == "alpaca":
            table = _alpaca(raw, origin, found if isinstance(found, Path) else None, root_dir, download)
        else:
            table = _CANONICAL[name](raw, origin, name)
    return _finalize(table, origin, name, categories)


def _locate(name: str, root: Path | None, file: str | Path | None, download: bool) -> Path | datasets.Dataset:
    """The local file (or HEx-PHI folder); failing that the hub copy when allowed; else a one-line "where to get it"."""
    if file is not None:
        path = Path(file).expanduser()
        if not path.exists():
            raise data_error(path, f"{name} file not found; check the dataset's file setting (e.g. data.harmful.file)")
        return path
    candidates = [root / rel for rel in DEFAULT_PATHS[name]] if root is not None else []
    for path in candidates:  # HEx-PHI is a folder of category files, every other dataset one file
        if path.is_dir() and any(path.glob("category_*.csv")) if name == "hexphi" else path.is_file():
            return path
    if name in HUB_SOURCES and (download or hub.offline()):
        return hub.load_hub(name)
    if root is None:
        raise DataError(f"no data root: set data.root=DIR or HARMSWEEP_DATA (or get {name} from {where_to_get(name)})")
    if name == "hexphi":
        raise data_error(candidates[0], f"no HEx-PHI category_N.csv files here; {HEXPHI_HOWTO}")
    raise data_error(
        candidates[0],
        f"{name} data not found; point data.root at the folder that holds {DEFAULT_PATHS[name][0]}, set its file "
        f"(e.g. data.harmful.file=PATH), or get it from {where_to_get(name)}",
    )


def _text(value: Any, origin: str | Path, where: str) -> str | None:
    """A cell value as text (numbers are converted, missing is None); lists or objects are a DataError."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise data_error(origin, f"{where} holds a {type(value).__name__}, expected text")


def _column(table: datasets.Dataset, name: str | None, origin: str | Path) -> list[str | None]:
    """One column as text values (all None when the table lacks it)."""
    if name is None or name not in table.column_names:
        return [None] * len(table)
    return [_text(v, origin, f"row {i} column {name!r}") for i, v in enumerate(table[name])]


def _canonical(**columns: list[str | None]) -> datasets.Dataset:
    """The one table layout every dataset is mapped to (missing fields are None)."""
    n = len(next(iter(columns.values())))
    full = {f: columns.get(f, [None] * n) for f in FIELDS}
    full["prompt"] = [p or "" for p in full["prompt"]]
    return datasets.Dataset.from_dict(full, features=FEATURES)


def _finalize(
    table: datasets.Dataset, origin: str | Path, name: str, categories: list[str] | str | None, dedupe: bool = True
) -> datasets.Dataset:
    """Drop blank prompts and exact duplicates (first kept; not with `dedupe=False`), then filter categories.

    A duplicate is the same prompt with the same response, so pair datasets (one prompt, several refusals) keep
    every pair; for prompt-only datasets this is plain prompt de-duplication.
    """
    prompts, responses, cats = list(table["prompt"]), list(table["response"]), list(table["category"])
    keep, seen = [], set()
    for i, key in enumerate(zip(prompts, responses, strict=True)):
        if key[0].strip() and (not dedupe or key not in seen):
            seen.add(key)
            keep.append(i)
    if not keep:
        raise data_error(origin, f"{name}: no usable rows (no non-blank prompts)")
    if len(keep) < len(table):
        log.info("%s: dropped %d blank or duplicate rows of %d in %s", name, len(table) - len(keep), len(table), origin)
    if isinstance(categories, str):  # `categories: malware` in a config means one category, not its letters
        categories = [categories]
    if categories:
        present = list(dict.fromkeys(cats[i] for i in keep if cats[i] is not None))
        if not present:
            raise data_error(
                origin, f"dataset {name!r} has no categories, so categories={list(categories)} cannot apply"
            )
        by_key = {c.casefold(): c for c in present}
        aliases = _HEXPHI_ALIASES if name == "hexphi" else {}
        chosen: set[str] = set()
        if name == "hexphi":  # the B-TAP authors' alias for their 5-category subset
            categories = [c for w in categories for c in (CHOSEN_FIVE if str(w).casefold() == "chosen_five" else [w])]
        for wanted in categories:
            key = str(wanted).strip().casefold()
            key = aliases.get(key, key)
            if key not in by_key:
                raise data_error(origin, f"unknown category {wanted!r} for {name}; available: {', '.join(present)}")
            chosen.add(by_key[key])
        keep = [i for i in keep if cats[i] in chosen]
    return table.select(keep)


def _minus(table: datasets.Dataset, folder: Path, names: dict[str, str], slug: str, minus: str) -> datasets.Dataset:
    """Keep the prompts of the one chosen category listed in the authors' `hex-phi_{C}_not_{M}.txt` (C without M).

    Files are named with the category names of HEx-PHI.jsonl; prompts are compared after stripping whitespace.
    """
    other = _HEXPHI_ALIASES.get(minus.strip().casefold(), minus.strip())
    path = folder / f"hex-phi_{names.get(slug, slug)}_not_{names.get(other, other)}.txt"
    listed = read_prompt_list(path)
    present = {p.strip() for p in table["prompt"]}
    missing = next((p for p in listed if p not in present), None)
    if missing is not None:
        raise data_error(path, f"listed prompt {missing!r} is not a {slug} prompt of the HEx-PHI data")
    wanted = set(listed)
    return table.select([i for i, p in enumerate(table["prompt"]) if p.strip() in wanted])


def _ids(name: str, ids: list[str | None]) -> list[str | None]:
    return [f"{name}:{v or i}" for i, v in enumerate(ids)]


def _advbench(raw: datasets.Dataset, origin: str | Path, name: str) -> datasets.Dataset:
    """AdvBench harmful_behaviors: goal -> prompt, target -> affirmative target prefix."""
    targets = [t or None for t in _column(raw, "target", origin)]
    return _canonical(prompt=_column(raw, "goal", origin), target=targets, source_id=_ids(name, [None] * len(raw)))


def _strongreject(raw: datasets.Dataset, origin: str | Path, name: str) -> datasets.Dataset:
    """StrongREJECT (category, source, forbidden_prompt)."""
    cats = [c or None for c in _column(raw, "category", origin)]
    return _canonical(
        prompt=_column(raw, "forbidden_prompt", origin), category=cats, source_id=_ids(name, [None] * len(raw))
    )


def _harmbench(raw: datasets.Dataset, origin: str | Path, name: str) -> datasets.Dataset:
    """HarmBench behaviors; contextual behaviors get their context prepended as HarmBench's own prompts do.

    The hub copy has no BehaviorID, so its rows are named by config and position.
    """
    behaviors = [b or "" for b in _column(raw, "Behavior", origin)]
    contexts = [(c or "").strip() for c in _column(raw, "ContextString", origin)]
    prompts = [f"{c}\n\n---\n\n{b}" if c and b.strip() else b for b, c in zip(behaviors, contexts, strict=True)]
    ids = _column(raw, "BehaviorID", origin)
    configs = _column(raw, "hub_config", origin)
    ids = [v or (f"{c}_{i}" if c else None) for i, (v, c) in enumerate(zip(ids, configs, strict=True))]
    cats = [c or None for c in _column(raw, "SemanticCategory", origin)]
    return _canonical(prompt=prompts, category=cats, source_id=_ids(name, ids))


def _strip_inst(text: str) -> str:
    """Remove a Llama-2 chat wrapper "[INST] ... [/INST]" and surrounding whitespace."""
    text = text.strip().removeprefix("<s>").strip().removeprefix("[INST]")
    return text.removesuffix("[/INST]").strip()


def _wei2024(raw: datasets.Dataset, origin: str | Path, name: str) -> datasets.Dataset:
    """Wei et al. 2024 safety-short CSV: Llama-2 chat prompts with refusal responses (several per prompt)."""
    index = next((c for c in ("Unnamed: 0", "") if c in raw.column_names), None)  # the unnamed pandas index column
    return _canonical(
        prompt=[_strip_inst(p or "") for p in _column(raw, "prompt", origin)],
        response=[(r or "").strip() or None for r in _column(raw, "response", origin)],
        source_id=_ids(name, _column(raw, index, origin)),
    )


def _alpaca_eval(raw: datasets.Dataset, origin: str | Path, name: str) -> datasets.Dataset:
    """AlpacaEval instructions with reference outputs; the `dataset` field (its sub-source) becomes the category."""
    return _canonical(
        prompt=_column(raw, "instruction", origin),
        response=_column(raw, "output", origin),
        category=_column(raw, "dataset", origin),
        source_id=_ids(name, [None] * len(raw)),
    )


def _alpaca(
    raw: datasets.Dataset, origin: str | Path, path: Path | None, root: Path | None, download: bool
) -> datasets.Dataset:
    """Alpaca instructions minus the safety-related items, so the set measures utility without refusals."""
    places = ([path.parent] if path is not None else []) + ([root / "alpaca"] if root is not None else [])
    filters = [p / n for p in dict.fromkeys(places) for n in SAFETY_FILTER_NAMES if (p / n).is_file()]
    listed: datasets.Dataset | None = None
    if filters:
        listed = read_file(filters[0], ["instruction"])
    elif download and not hub.offline():
        listed = hub.load_url_json(ALPACA_SAFETY_SOURCE)
    unsafe: set[tuple[str, str]] = set()
    if listed is not None:  # an Alpaca example is identified by its (instruction, input) pair
        pairs = zip(_column(listed, "instruction", "filter"), _column(listed, "input", "filter"), strict=True)
        unsafe = {(str(i or ""), str(x or "")) for i, x in pairs}
    instructions = [i or "" for i in _column(raw, "instruction", origin)]
    extras = [x or "" for x in _column(raw, "input", origin)]
    outputs = _column(raw, "output", origin)
    keep = [i for i, pair in enumerate(zip(instructions, extras, strict=True)) if pair not in unsafe]
    if listed is not None:
        log.info("alpaca: removed %d of %d items listed as safety-related", len(raw) - len(keep), len(raw))
    else:
        log.warning("alpaca: no %s found, so safety-related items are NOT removed", SAFETY_FILTER_NAMES[0])
    if not keep:
        raise data_error(origin, "no usable rows: every item is listed in the safety filter")
    return _canonical(
        prompt=[f"{instructions[i]}\n\n{extras[i]}" if extras[i] else instructions[i] for i in keep],
        response=[outputs[i] for i in keep],
        source_id=[f"alpaca:{i}" for i in keep],
    )


def _custom(raw: datasets.Dataset, path: Path, columns: Mapping[str, str] | None) -> datasets.Dataset:
    """A user file with `columns` mapping Record fields (and `id`) to its column names (defaults: same names)."""
    unknown = sorted(set(columns or {}) - set(CUSTOM_FIELDS))
    if unknown:
        raise data_error(path, f"unknown field(s) {', '.join(unknown)} in columns; allowed: {', '.join(CUSTOM_FIELDS)}")
    mapping = {**CUSTOM_DEFAULT_COLUMNS, **(columns or {})}
    require([mapping["prompt"], *(columns or {}).values()], raw.column_names, path)  # named, so must exist
    values = {field: _column(raw, col, path) for field, col in mapping.items()}
    optional = {f: [v or None for v in values.get(f, [None] * len(raw))] for f in ("response", "category", "target")}
    return _canonical(
        prompt=values["prompt"], source_id=_ids(path.stem, values.get("id", [None] * len(raw))), **optional
    )


_CANONICAL = {
    "advbench": _advbench,
    "strongreject": _strongreject,
    "strongreject_small": _strongreject,
    "harmbench": _harmbench,
    "alpaca_eval": _alpaca_eval,
    "wei2024_refusals": _wei2024,
}
