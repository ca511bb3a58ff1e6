"""Cache entries are verified against their manifest before use; damaged ones are moved aside and recomputed."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import write_pairs
from safetensors.torch import load_file
from test_cli import file_run_args, harmsweep

from harmsweep.artifacts import atomic_path
from harmsweep.cache import MANIFEST, cached, entry_problem, file_sha256

MAIN = "value.bin"
SIZE = 64 * 1024


class Entry:
    """A two-file cache entry whose compute counts its calls and whose value names the computation."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.computed = 0

    def compute(self, entry: Path) -> bytes:
        self.computed += 1
        value = bytes([self.computed]) * SIZE
        with atomic_path(entry / "info.json") as tmp:
            tmp.write_text(json.dumps({"computation": self.computed}))
        with atomic_path(entry / MAIN) as tmp:
            tmp.write_bytes(value)
        return value

    def get(self, load: Callable[[Path], bytes] | None = None) -> tuple[bytes, bool]:
        return cached(self.path, self.compute, load or (lambda e: (e / MAIN).read_bytes()), MAIN)


@pytest.fixture
def made(tmp_path: Path) -> Entry:
    entry = Entry(tmp_path / "scores" / "ab12")
    value, computed = entry.get()
    assert computed and value == b"\x01" * SIZE
    return entry


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _assert_recomputed(entry: Entry, caplog: pytest.LogCaptureFixture, problem: str) -> None:
    with caplog.at_level(logging.INFO, logger="harmsweep.cache"):
        value, computed = entry.get()
    assert (value, computed) == (b"\x02" * SIZE, True) and entry.computed == 2  # the fresh value
    (line,) = _warnings(caplog)  # exactly one warning line
    (aside,) = entry.path.parent.glob("ab12.corrupt-*")
    assert line.startswith("scores/ab12: ") and problem in line and str(aside) in line and line.endswith("recomputing")
    assert "\n" not in line
    assert entry_problem(entry.path, MAIN) is None  # the new entry is complete and verified
    assert cached(entry.path, entry.compute, lambda e: (e / MAIN).read_bytes(), MAIN) == (value, False)


def test_a_clean_entry_is_loaded_without_recomputing(made, caplog):
    manifest = json.loads((made.path / MANIFEST).read_text())
    assert manifest["marker"] == MAIN
    assert manifest["files"][MAIN] == {"bytes": SIZE, "sha256": file_sha256(made.path / MAIN)}
    assert set(manifest["files"]) == {MAIN, "info.json"}
    with caplog.at_level(logging.INFO, logger="harmsweep.cache"):
        assert made.get() == (b"\x01" * SIZE, False)
    assert made.computed == 1 and not _warnings(caplog)


def test_a_truncated_file_is_moved_aside_and_recomputed(made, caplog):
    os.truncate(made.path / MAIN, SIZE - 3)
    _assert_recomputed(made, caplog, f"{MAIN} is 65,533 bytes, manifest says 65,536")
    (aside,) = made.path.parent.glob("ab12.corrupt-*")
    assert (aside / MAIN).stat().st_size == SIZE - 3  # kept as it was, for inspection


def test_a_flipped_byte_is_caught_by_the_checksum(made, caplog):
    with open(made.path / MAIN, "r+b") as f:
        f.seek(SIZE // 2)
        byte = f.read(1)
        f.seek(SIZE // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert (made.path / MAIN).stat().st_size == SIZE
    _assert_recomputed(made, caplog, f"{MAIN} has sha256")


def test_a_missing_file_is_caught(made, caplog):
    (made.path / "info.json").unlink()
    _assert_recomputed(made, caplog, "info.json is missing")


def test_an_unreadable_manifest_is_caught(made, caplog):
    os.truncate(made.path / MANIFEST, 10)
    _assert_recomputed(made, caplog, f"{MANIFEST} is unreadable")


def test_a_legacy_entry_that_fails_to_load_is_recomputed(made, caplog):
    (made.path / MANIFEST).unlink()
    os.truncate(made.path / MAIN, 5)

    def strict(entry: Path) -> bytes:
        data = (entry / MAIN).read_bytes()
        if len(data) != SIZE:
            raise ValueError(f"incomplete file\n{len(data)} bytes")
        return data

    with caplog.at_level(logging.INFO, logger="harmsweep.cache"):
        value, computed = made.get(strict)
    assert (value, computed) == (b"\x02" * SIZE, True)
    (line,) = _warnings(caplog)
    assert "no MANIFEST.json (older version) and loading it failed: ValueError: incomplete file" in line
    assert len(list(made.path.parent.glob("ab12.corrupt-*"))) == 1 and entry_problem(made.path, MAIN) is None


def test_a_legacy_entry_that_loads_gets_its_manifest(made, caplog):
    (made.path / MANIFEST).unlink()
    with caplog.at_level(logging.INFO, logger="harmsweep.cache"):
        assert made.get() == (b"\x01" * SIZE, False)
    assert made.computed == 1 and not _warnings(caplog)
    assert entry_problem(made.path, MAIN) is None  # verified from now on
    os.truncate(made.path / MAIN, 1)
    _assert_recomputed(made, caplog, f"{MAIN} is 1 bytes, manifest says 65,536")


def test_a_load_failure_after_a_checksum_match_is_a_bug_and_raises(made):
    def broken(entry: Path) -> bytes:
        raise KeyError("loader bug")

    with pytest.raises(KeyError, match="loader bug"):
        made.get(broken)
    assert made.computed == 1 and not list(made.path.parent.glob("ab12.corrupt-*"))


def test_a_dead_writers_temp_file_is_not_part_of_the_entry(tmp_path):
    entry = Entry(tmp_path / "k")
    entry.path.mkdir(parents=True)
    (entry.path / f".{MAIN}.tmp-99999").write_bytes(b"half")
    entry.get()
    assert set(json.loads((entry.path / MANIFEST).read_text())["files"]) == {MAIN, "info.json"}


def test_a_compute_that_does_not_write_the_main_file_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="did not write its main file"):
        cached(tmp_path / "k", lambda e: 1, lambda e: 2, MAIN)
    assert not (tmp_path / "k" / MANIFEST).exists()


def test_damage_twice_in_a_second_keeps_both_copies(made):
    for _ in range(2):
        os.truncate(made.path / MAIN, 7)
        assert made.get()[1]
    assert len(list(made.path.parent.glob("ab12.corrupt-*"))) == 2


def test_concurrent_jobs_move_a_damaged_entry_aside_once(made, caplog):
    """Three jobs find the same damaged entry: one moves it aside and recomputes, the others wait and
    load the fresh one. Threads, not processes, keep it fast: flock locks separate opens of the lock
    file against each other exactly as it does separate processes."""
    os.truncate(made.path / MAIN, 100)
    computations: list[int] = []
    start = threading.Barrier(3)

    def compute(e: Path) -> str:
        computations.append(threading.get_ident())
        time.sleep(0.2)  # the others are now waiting on the lock
        with atomic_path(e / MAIN) as tmp:
            tmp.write_text("fresh")
        return "fresh"

    def job() -> tuple[str, bool]:
        start.wait()
        return cached(made.path, compute, lambda e: (e / MAIN).read_text(), MAIN)

    with caplog.at_level(logging.INFO, logger="harmsweep.cache"), ThreadPoolExecutor(3) as pool:
        results = [f.result(timeout=60) for f in [pool.submit(job) for _ in range(3)]]
    assert sorted(results) == [("fresh", False), ("fresh", False), ("fresh", True)]
    assert len(computations) == 1 and len(_warnings(caplog)) == 1
    assert len(list(made.path.parent.glob("ab12.corrupt-*"))) == 1


# End to end: a real run on the tiny model, then damage its cached artifacts and run again in a new folder.
# A small sparsity, so the masks come from scores whatever the score file's format keeps.
E2E = ["eval=likelihood", "pruning.sparsity=0.005"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run (root/run) and its cache (root/cache); its data (root/data) stays put, since
    the calibration key includes the data files' paths."""
    root = tmp_path_factory.mktemp("reference")
    proc = harmsweep(*file_run_args(root / "run", *write_pairs(root / "data", 12), *E2E), cwd=root)
    assert proc.returncode == 0, proc.stderr
    return root


def _flip_middle(path: Path, n: int = 8) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 2)
        data = f.read(n)
        f.seek(size // 2)
        f.write(bytes(b ^ 0x5A for b in data))
    assert path.stat().st_size == size


@pytest.mark.parametrize("how", ["truncate", "flip"])
@pytest.mark.parametrize("kind", ["scores", "calibration"])
def test_a_damaged_cache_is_recomputed_and_gives_the_same_mask(reference, tmp_path, kind, how):
    for part in ("run", "cache"):
        shutil.copytree(reference / part, tmp_path / part)
    first = json.loads((tmp_path / "run" / "result.json").read_text())
    scores = Path(first["artifacts"]["scores_harm"]).relative_to(reference)
    artifacts = tmp_path / "cache" / "artifacts"
    if kind == "scores":
        target = tmp_path / scores
    else:
        (target,) = artifacts.glob("calibration/*/calibration.safetensors")
    if how == "truncate":
        os.truncate(target, target.stat().st_size - 1024)
    else:
        _flip_middle(target)

    data = reference / "data"
    proc = harmsweep(
        *file_run_args(tmp_path / "again", data / "harmful.jsonl", data / "benign.jsonl", *E2E), cwd=tmp_path
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    (line,) = [line for line in out.splitlines() if "; recomputing" in line]
    assert f"{kind}/{target.parent.name}: {target.name} " in line and "moved to" in line
    assert len(list((artifacts / kind).glob(f"{target.parent.name}.corrupt-*"))) == 1
    again = json.loads((tmp_path / "again" / "result.json").read_text())
    assert again["computed"]["calibration"] is (kind == "calibration")
    assert again["computed"]["eval_before"] is False
    mask = load_file(tmp_path / "run" / "mask.safetensors")
    mask_again = load_file(tmp_path / "again" / "mask.safetensors")
    assert mask.keys() == mask_again.keys() and all(mask[k].equal(mask_again[k]) for k in mask)
    assert again["n_pruned"] == first["n_pruned"] > 0
