"""Prompt datasets as `Record`s, read through Hugging Face `datasets` from local files or pinned hub sources, plus
seeded prompt-disjoint splits.

The rest of harmsweep only needs `load_records` and the split helpers; formats, file locations and published sources
live in this package so that a missing or malformed dataset fails here, early, with a one-line DataError.
"""

from harmsweep.data.loaders import load_records, load_table
from harmsweep.data.records import Record
from harmsweep.data.sources import DATASETS, DEFAULT_PATHS, FILE_ONLY, HEXPHI_CATEGORIES, HUB_SOURCES, HubSource
from harmsweep.data.splits import split_dataset, split_disjoint, split_indices, take

__all__ = [
    "DATASETS",
    "DEFAULT_PATHS",
    "FILE_ONLY",
    "HEXPHI_CATEGORIES",
    "HUB_SOURCES",
    "HubSource",
    "Record",
    "load_records",
    "load_table",
    "split_dataset",
    "split_disjoint",
    "split_indices",
    "take",
]
