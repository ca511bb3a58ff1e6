"""A finished sweep's manifest: relaunching the same command answers from it, composing no job.

Relaunching a finished 16-run local sweep composed 25 configs (5 s on 2 cores) only to learn that every run was done.
After a multirun whose every run finished in the driver process (the basic launcher), the driver writes
``<sweep dir>/.harmsweep/finished-<key>.json``: each run's folder, run id, and its result.json's size and mtime.
``<key>`` digests all that the runs' configs derive from: the command line's overrides, the config tree's files,
harmsweep's own source, and the environment variables the configs read (``oc.env``). A relaunch with the same key
whose every result.json is unchanged prints the runs from them; anything else (another override, an edited config,
a deleted or rewritten run) takes the usual path, which composes and checks every job.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from harmsweep.artifacts import write_json
from harmsweep.config.identity import stored_run_id

FOLDER = ".harmsweep"
PACKAGE = Path(__file__).resolve().parents[1]
ENV_READ = re.compile(r"oc\.env:([A-Za-z_][A-Za-z0-9_]*)")


def key(overrides: Sequence[str], conf_dir: Path, env: Mapping[str, str] | None = None) -> str:
    """What a sweep's run configs (and so its run ids and folders) are made of, digested."""
    env = os.environ if env is None else env
    digest = hashlib.sha256(json.dumps(list(overrides)).encode())
    texts = ["\n".join(overrides)]
    for root, pattern in ((conf_dir, "*"), (PACKAGE, "*.py")):
        for path in sorted(p for p in root.rglob(pattern) if p.is_file() and "__pycache__" not in p.parts):
            data = path.read_bytes()
            digest.update(str(path.relative_to(root)).encode() + b"\0" + data + b"\0")
            if root is conf_dir:
                texts.append(data.decode(errors="replace"))
    for name in sorted({m for text in texts for m in ENV_READ.findall(text)}):
        digest.update(f"{name}={env.get(name)}\0".encode())
    return digest.hexdigest()[:20]


def path(sweep_dir: Path, digest: str) -> Path:
    return sweep_dir / FOLDER / f"finished-{digest}.json"


def _stamp(result: Path) -> list[int]:
    stat = result.stat()
    return [stat.st_size, stat.st_mtime_ns]


def write(sweep_dir: Path, digest: str, runs: Iterable[tuple[Path, str]]) -> Path:
    """The manifest of a sweep whose every run (folder, run id) has its result.json."""
    entries = [{"dir": str(d.resolve()), "run_id": rid, "result": _stamp(d / "result.json")} for d, rid in runs]
    target = path(sweep_dir, digest)
    write_json({"key": digest, "runs": entries}, target)
    return target


def finished_runs(sweep_dir: Path, digest: str) -> list[tuple[Path, dict[str, Any]]] | None:
    """Each run's folder and result, when the manifest exists and every run in it is as it was; else None."""
    try:
        entries = json.loads(path(sweep_dir, digest).read_text())["runs"]
        runs = []
        for entry in entries:
            run_dir = Path(entry["dir"])
            result = run_dir / "result.json"
            if _stamp(result) != entry["result"] or (run_dir / "FAILED").exists():
                return None
            if stored_run_id(run_dir) != entry["run_id"]:
                return None
            runs.append((run_dir, json.loads(result.read_text())))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return runs or None
