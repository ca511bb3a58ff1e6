"""Prompt datasets as `Record`s, read from local files (download is opt-in), plus seeded prompt-disjoint splits.

The rest of harmsweep only needs `load_records` and the split helpers; formats, file locations and published sources
live in this package so that a missing or malformed file fails here, early, with a one-line DataError.
"""

from harmsweep.data.hub import HUB_SOURCES
from harmsweep.data.loaders import (
    DATASETS,
    DEFAULT_PATHS,
    HEXPHI_CATEGORIES,
    load_records,
)
from harmsweep.data.records import Record
from harmsweep.data.splits import split_disjoint, take

__all__ = [
    "DATASETS",
    "DEFAULT_PATHS",
    "HEXPHI_CATEGORIES",
    "HUB_SOURCES",
    "Record",
    "load_records",
    "split_disjoint",
    "take",
]
