"""A content-keyed artifact cache shared by every run of every sweep.

Calibration sets, scores and the unpruned model's evaluation depend on the model, the exact records,
the settings and the code, not on the pruning rule or sparsity: keyed by a hash of those, a K-level
sparsity sweep calibrates, scores and evaluates the unpruned model once.
Concurrent jobs that need the same key serialise on a lock file: exactly one computes, the others
wait and then load. Artifacts appear by atomic rename (artifacts.atomic_path), so a crashed writer
leaves nothing that looks complete, and its lock dies with its process.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch

log = logging.getLogger(__name__)
T = TypeVar("T")

# Bump when the code that produces an artifact changes its output: old entries are then ignored.
VERSIONS = {
    "calibration": "calibration-v1",
    "scores": "scores-v2",
    "eval": "eval-before-v1",
    "references": "references-v1",
}


def content_key(*parts: Any) -> str:
    """Stable hash of JSON-serialisable parts (dict order does not matter)."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def tensor_key(tensors: Mapping[str, Any]) -> str:
    """Content hash of named tensors (a tokenised calibration set): equal sets share their scores."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:20]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached(entry: Path, compute: Callable[[Path], T], load: Callable[[Path], T], marker: str) -> tuple[T, bool]:
    """Load ``entry/marker`` if present, else compute it under the entry's lock.

    ``compute(entry)`` must write every file of the entry atomically, ``marker`` last. Returns the
    value and whether this call computed it (so runs can report what they reused).
    """
    done = entry / marker
    if done.is_file():
        return load(entry), False
    with _locked(entry.with_name(entry.name + ".lock")):
        if done.is_file():  # another job finished it while we waited
            log.info("reusing %s (computed concurrently)", entry)
            return load(entry), False
        entry.mkdir(parents=True, exist_ok=True)
        return compute(entry), True


def write_key_info(entry: Path, info: Mapping[str, Any]) -> None:
    """What went into the key, beside the artifact, for humans tracing where it came from."""
    from harmsweep.artifacts import write_json

    write_json(dict(info), entry / "key.json")
