"""Prompt datasets as `Record`s, read through Hugging Face `datasets` from local files or pinned hub sources, plus
seeded prompt-disjoint splits.

The rest of harmsweep only needs `load_records` and the split helpers; formats, file locations and published sources
live in this package so that a missing or malformed dataset fails here, early, with a one-line DataError. The loaders
(and `datasets`) are imported on first use: the command line reads the ``data`` block (data/spec.py) without them.
"""

from __future__ import annotations

import importlib
from typing import Any

from harmsweep.data.records import Record

_LAZY = {
    "load_records": "loaders", "load_table": "loaders",
    "DATASETS": "sources", "DEFAULT_PATHS": "sources", "FILE_ONLY": "sources", "HEXPHI_CATEGORIES": "sources",
    "HUB_SOURCES": "sources", "HubSource": "sources",
    "split_dataset": "splits", "split_disjoint": "splits", "split_indices": "splits", "take": "splits",
}  # fmt: skip

__all__ = ["Record", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"harmsweep.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'harmsweep.data' has no attribute {name!r}")
