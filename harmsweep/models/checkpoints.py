"""Where a checkpoint lives: one resolver for every caller (loading a model, reading base weights, sizing a job).

A checkpoint spec (a ``model.variants.<name>`` entry, or ``model.path``) names a tiny random-init model
(``tiny``), a GGUF file shipped in installed wheels (``embedded``: one file, or parts joined once into
``cache_dir/gguf``), a local ``path`` (a folder or a ``.gguf`` file; a relative name that is no folder is a
hub id), or a ``hub_id``. ``locate`` says which, without reading weights and without torch.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harmsweep.errors import HarmsweepError
from harmsweep.models.spec import ModelConfig

log = logging.getLogger(__name__)
KINDS = ("tiny", "gguf", "dir", "hub")


@dataclass(frozen=True)
class Checkpoint:
    """A located checkpoint: ``kind`` and the one field that kind reads."""

    kind: str  # tiny | gguf | dir | hub
    path: Path | None = None  # gguf: the file; dir: the folder
    hub_id: str | None = None
    tiny: Mapping[str, Any] | None = None
    not_installed: str | None = None  # hub: why the embedded file was passed over (the error if the hub fails too)


def checkpoint_spec(model: ModelConfig, alignment: str) -> tuple[Mapping[str, Any], str]:
    """The spec of the checkpoint a run of ``alignment`` loads, and its config key. ``model.path`` is the run's
    checkpoint, except for an alignment given a variant of its own (``model.variants.base.path=DIR`` beside it).
    A model by path alone with no such variant is refused for other alignments before (config/checks.py)."""
    variants = model.variants or {}
    if model.path and (alignment == "aligned" or alignment not in variants):
        return {"path": model.path}, "model.path"
    if alignment not in variants:
        raise HarmsweepError(
            f"model={model.name} has no checkpoint for alignment={alignment} (it has: "
            f"{', '.join(sorted(variants)) or 'none'}); pick one of those or pass model.path=DIR"
        )
    return variants[alignment], f"model.variants.{alignment}"


def locate(spec: Mapping[str, Any], what: str, where: str, cache_dir: Path) -> Checkpoint:
    """The checkpoint ``spec`` names. ``what`` names it in errors (``model=x alignment=y``), ``where`` is its
    config key (``model.path``, ``model.variants.base``); a missing local file or folder fails here, in one line."""
    if spec.get("tiny"):
        return Checkpoint("tiny", tiny=dict(spec["tiny"]))
    not_installed = None
    if spec.get("embedded"):
        found = embedded_checkpoint(spec["embedded"], cache_dir)
        if found is not None:
            return Checkpoint("gguf", path=found)
        not_installed = f"the embedded model of {what} is not installed{_install_hint(spec['embedded'])}"
        if not spec.get("hub_id"):
            raise HarmsweepError(not_installed)
    key = where if where.endswith(".path") else f"{where}.path"
    if spec.get("path"):
        path = Path(os.path.expanduser(str(spec["path"])))
        if path.suffix == ".gguf":
            if not path.is_file():
                raise HarmsweepError(f"GGUF file not found: {path} ({key})")
            return Checkpoint("gguf", path=path)
        if path.is_dir():
            return Checkpoint("dir", path=path)
        if path.is_absolute() or str(spec["path"]).startswith("."):
            raise HarmsweepError(f"{key} not found: {path} (give a local directory, a .gguf file or a hub id)")
        return Checkpoint("hub", hub_id=str(spec["path"]), not_installed=not_installed)
    if spec.get("hub_id"):
        return Checkpoint("hub", hub_id=str(spec["hub_id"]), not_installed=not_installed)
    raise HarmsweepError(f"checkpoint of {what} ({where}) names no path, hub_id, embedded or tiny")


def embedded_gguf(package: str, file: str) -> Path | None:
    """Locate a GGUF file inside an installed wheel without importing the package.

    The wheels that carry model files often import heavy plugins from ``__init__``; find_spec only
    reads the package's location.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / file
    return path if path.is_file() else None


def embedded_checkpoint(embedded: Mapping[str, Any], cache_dir: Path) -> Path | None:
    """The GGUF file an ``embedded`` spec names, or None while its wheel(s) are not all installed.

    A single-file spec points into its wheel; a split one is assembled once into ``cache_dir/gguf``
    (see ``assemble_parts``), after which the wheels are no longer read.
    """
    if not embedded.get("parts"):
        return embedded_gguf(str(embedded["package"]), str(embedded["file"]))
    target = _assembled_path(embedded, cache_dir)
    if target.is_file():
        return target
    found = [embedded_gguf(str(part["package"]), str(part["file"])) for part in embedded["parts"]]
    if any(path is None for path in found):
        return None
    size = embedded.get("size")
    return assemble_parts(
        [p for p in found if p is not None], target, str(embedded["sha256"]), size, _install_command(embedded)
    )


def missing_parts(embedded: Mapping[str, Any]) -> list[str]:
    """The packages of ``embedded`` whose file is not installed, in config order."""
    parts = embedded.get("parts") or [embedded]
    return [str(p["package"]) for p in parts if embedded_gguf(str(p["package"]), str(p["file"])) is None]


def _install_command(embedded: Mapping[str, Any]) -> str:
    """How to install the wheel(s) of ``embedded``: its make target if it names one, and the pip line."""
    if not embedded.get("parts"):
        return f"pip install --no-deps {embedded.get('wheel', embedded['package'])}"
    wheels = embedded.get("wheels") or [p["package"] for p in embedded["parts"]]
    pip = f"pip install --no-deps {wheels if isinstance(wheels, str) else ' '.join(map(str, wheels))}"
    return f"make {embedded['make_target']}, or {pip}" if embedded.get("make_target") else pip


def _install_hint(embedded: Mapping[str, Any]) -> str:
    """The tail of the not-installed error: which parts are missing, then the install command."""
    if not embedded.get("parts"):
        return f": {_install_command(embedded)}"
    missing = missing_parts(embedded)
    return f" (missing {', '.join(missing)} of {len(embedded['parts'])} parts): {_install_command(embedded)}"


def _assembled_path(embedded: Mapping[str, Any], cache_dir: Path) -> Path:
    """Where the joined parts live: named by the spec's ``gguf`` and the pinned hash, so a new pin is a new file."""
    name = Path(str(embedded.get("gguf") or "embedded.gguf"))
    return cache_dir / "gguf" / f"{name.stem}-{str(embedded['sha256'])[:12]}{name.suffix or '.gguf'}"


def assemble_parts(parts: list[Path], target: Path, sha256: str, size: int | None = None, fix: str = "") -> Path:
    """Concatenate ``parts`` into ``target`` once, checked against ``size`` and ``sha256``.

    The bytes go to a temporary file that is renamed into place only once they verify, so a crash or
    a mismatch never leaves a ``target`` that a later run would take as done. Concurrent callers
    serialise on a lock file. ``fix`` (an install command) ends the error of a mismatch.
    """
    fix = f"; reinstall the pinned wheels: {fix}" if fix else "; reinstall the pinned wheels"
    total = sum(p.stat().st_size for p in parts)
    if size is not None and total != int(size):
        raise HarmsweepError(f"the parts of {target.name} hold {total:,} bytes, not the pinned {int(size):,}{fix}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(f"{target.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file():
            return target
        for stale in target.parent.glob(f"{target.name}.tmp-*"):  # left by a crashed holder of this lock
            stale.unlink(missing_ok=True)
        log.info("assembling %s from %d parts (once)", target.name, len(parts))
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        digest = hashlib.sha256()
        try:
            with open(tmp, "wb") as out:
                for part in parts:
                    with open(part, "rb") as src:
                        while chunk := src.read(1 << 24):
                            digest.update(chunk)
                            out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if digest.hexdigest() != sha256.lower():
                raise HarmsweepError(
                    f"the parts of {target.name} join to sha256 {digest.hexdigest()[:16]}..., not the pinned "
                    f"{sha256.lower()[:16]}...{fix}"
                )
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target
