"""Atomic file output: a reader never sees a half-written artifact.

Every artifact is written to a temporary name in the same folder and renamed into place, so its
existence means it is complete; a crash leaves only a ``.tmp-*`` file that nothing reads.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write to; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def finite(data: Any) -> Any:
    """NaN and infinities become None: strict JSON readers (and W&B, pandas) reject them."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: finite(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [finite(v) for v in data]
    return data


def write_json(data: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(finite(data), indent=2, allow_nan=False) + "\n")


def write_jsonl(rows: list[dict[str, Any]], path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(finite(r), ensure_ascii=False, allow_nan=False) + "\n" for r in rows))
