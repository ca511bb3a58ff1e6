"""A content-keyed artifact cache shared by every run of every sweep.

Calibration sets, scores and the unpruned model's evaluation depend on the model, the exact records,
the settings and the code, not on the pruning rule or sparsity: keyed by a hash of those, a K-level
sparsity sweep calibrates, scores and evaluates the unpruned model once.
Concurrent jobs that need the same key serialise on a lock file: exactly one computes, the others
wait and then load. Artifacts appear by atomic rename (artifacts.atomic_path), so a crashed writer
leaves nothing that looks complete, and its lock dies with its process.

Atomic renames do not protect against what happens to a file later (a full quota, a half-finished
copy between clusters, a bad disk), so an entry is complete only once its manifest
(``entry/MANIFEST.json``: every file's size and SHA-256) exists, and it is used only after its files
match it. A damaged entry is moved aside (``<entry>.corrupt-<UTC time>``, kept for inspection),
reported in one warning line and recomputed, rather than ending a run in a traceback or, worse,
feeding it wrong numbers.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import torch

from harmsweep.artifacts import write_json

log = logging.getLogger(__name__)
T = TypeVar("T")

# Bump when the code that produces an artifact changes its output: old entries are then ignored.
VERSIONS = {
    "calibration": "calibration-v1",
    "scores": "scores-v3",
    "eval": "eval-before-v2",  # v2: per-item values (samples) beside the metrics
    "references": "references-v1",
}

MANIFEST = "MANIFEST.json"  # the completion marker: written last, after every file of the entry
MANIFEST_FORMAT = "harmsweep-manifest-v1"
# SHA-256 runs at ~1.5 GB/s here (SHA-NI via OpenSSL), about twice BLAKE2b; 4 MiB reads keep its speed.
CHUNK = 4 << 20


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


def mask_key(mask: Mapping[str, torch.Tensor] | None) -> str:
    """A content key of a mask; "" for none (or only empty entries)."""
    live = {n: i for n, i in (mask or {}).items() if i.numel()}
    digest = hashlib.sha256()
    for name in sorted(live):
        digest.update(name.encode() + live[name].detach().to("cpu", torch.int64).numpy().tobytes())
    return digest.hexdigest()[:16] if live else ""


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
    """Load ``entry`` if it is complete and intact, else compute it under the entry's lock.

    ``compute(entry)`` must write every file of the entry atomically, ``marker`` (the main file) last;
    the manifest is then written here and is what makes the entry complete. Returns the value and
    whether this call computed it (so runs can report what they reused).

    A damaged entry (a file missing, of the wrong size or checksum, an unreadable manifest) is never
    loaded: it is moved aside, reported in one warning and recomputed. Once the files match, a
    failing ``load`` is a bug in the loader, not damage, and raises.

    An entry with ``marker`` but no manifest was written by an older version (or its writer died
    between the two). Recomputing it would throw away work (scores, a fine-tuned checkpoint) that is
    almost always fine, so it is loaded: if that raises (a truncated safetensors file does), it is
    moved aside and recomputed; if it loads, its manifest is written so it is verified from then on.
    Damage that loading cannot see (a flipped byte in tensor data) goes unnoticed in such an entry,
    as it did before manifests.
    """
    if (entry / MANIFEST).is_file() and entry_problem(entry, marker) is None:
        return load(entry), False
    with _locked(entry.with_name(entry.name + ".lock")):
        # Re-check under the lock: another job may have finished, repaired or moved the entry meanwhile.
        if (entry / MANIFEST).is_file():
            problem = entry_problem(entry, marker)
            if problem is None:
                log.info("reusing %s (computed concurrently)", entry)
                return load(entry), False
            _quarantine(entry, problem)
        elif (entry / marker).is_file():
            try:
                value = load(entry)
            except Exception as exc:  # any failure to load an unverifiable entry means it is unusable
                _quarantine(entry, f"no {MANIFEST} (older version) and loading it failed: {_first_line(exc)}")
            else:
                write_manifest(entry, marker)
                log.info("%s: wrote the %s that an older version did not", _label(entry), MANIFEST)
                return value, False
        entry.mkdir(parents=True, exist_ok=True)
        value = compute(entry)
        if not (entry / marker).is_file():
            raise RuntimeError(f"computing {entry} did not write its main file {marker}")
        write_manifest(entry, marker)
        return value, True


def replaced(
    entry: Path, compute: Callable[[Path], T], load: Callable[[Path], T], marker: str, stale: Callable[[T], bool]
) -> tuple[T, bool]:
    """Recompute an intact entry that no longer serves (``stale``: a score tail too short for a run) and swap
    it in under the entry's lock: the new files are complete, manifest included, before the old entry moves
    aside, so a reader finds the old entry, none (and waits for the lock), or the new one. Returns the value
    and whether this call computed it (another job may have replaced it meanwhile)."""
    with _locked(entry.with_name(entry.name + ".lock")):
        if not stale(value := load(entry)):
            return value, False
        fresh, old = (entry.with_name(f"{entry.name}.{tag}-{os.getpid()}") for tag in ("new", "old"))
        shutil.rmtree(fresh, ignore_errors=True)
        fresh.mkdir(parents=True)
        compute(fresh)
        if not (fresh / marker).is_file():
            raise RuntimeError(f"computing {entry} did not write its main file {marker}")
        write_manifest(fresh, marker)
        entry.rename(old)
        fresh.rename(entry)
        shutil.rmtree(old, ignore_errors=True)
        return load(entry), True


def entry_problem(entry: Path, marker: str | None = None) -> str | None:
    """What is wrong with ``entry`` against its manifest, or None when every listed file matches.

    Sizes are checked for every file before any is read (a truncation costs a stat, not a hash);
    then checksums, streamed in ``CHUNK`` reads. ``marker``, when given, must be listed.
    """
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        files = {str(name): (int(rec["bytes"]), str(rec["sha256"])) for name, rec in manifest["files"].items()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"{MANIFEST} is unreadable ({_first_line(exc)})"
    if marker is not None and marker not in files:
        return f"{MANIFEST} does not list {marker}"
    for name, (size, _) in files.items():
        try:
            actual = (entry / name).stat().st_size
        except FileNotFoundError:
            return f"{name} is missing"
        except OSError as exc:
            return f"{name} is unreadable ({_first_line(exc)})"
        if actual != size:
            return f"{name} is {actual:,} bytes, manifest says {size:,}"
    for name, (_, digest) in files.items():
        try:
            actual_digest = file_sha256(entry / name)
        except OSError as exc:
            return f"{name} is unreadable ({_first_line(exc)})"
        if actual_digest != digest:
            return f"{name} has sha256 {actual_digest[:12]}..., manifest says {digest[:12]}... (same size: corrupted)"
    return None


def write_manifest(entry: Path, marker: str) -> dict[str, Any]:
    """Record every file of ``entry`` (size, SHA-256), atomically: its appearance completes the entry.

    Temporary files of atomic writes (``.name.tmp-<pid>``, a dead writer's leftovers) are not part of it.
    """
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(entry.rglob("*")):
        name = path.relative_to(entry).as_posix()
        if name == MANIFEST or not path.is_file() or _transient(path):
            continue
        files[name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    manifest = {"format": MANIFEST_FORMAT, "marker": marker, "files": files}
    write_json(manifest, entry / MANIFEST)
    return manifest


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in ``CHUNK`` pieces into one buffer (memory stays flat for any size)."""
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while n := handle.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def _quarantine(entry: Path, problem: str) -> Path:
    """Move a damaged entry aside (one atomic rename, under the entry's lock) and say so in one line."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dest = entry.with_name(f"{entry.name}.corrupt-{stamp}")
    n = 1
    while dest.exists():  # the same entry damaged twice in one second
        n += 1
        dest = entry.with_name(f"{entry.name}.corrupt-{stamp}-{n}")
    os.rename(entry, dest)
    log.warning("%s: %s; moved to %s; recomputing", _label(entry), problem, dest)
    return dest


def _label(entry: Path) -> str:
    return f"{entry.parent.name}/{entry.name}"


def _transient(path: Path) -> bool:
    return path.name.startswith(".") and ".tmp-" in path.name


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def write_key_info(entry: Path, info: Mapping[str, Any]) -> None:
    """What went into the key, beside the artifact, for humans tracing where it came from."""
    write_json(dict(info), entry / "key.json")
