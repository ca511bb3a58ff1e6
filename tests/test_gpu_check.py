"""bench/gpu_check.py runs once per GPU machine, so its --smoke mode must run every section here first."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
SECTIONS = "ABCDEF"
# SKIP reasons a CPU machine legitimately gives; any other SKIP hides a check that should have run
CPU_SKIPS = ("no CUDA device", "vLLM is not installed")


def smoke(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out), *args], capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    return done, json.loads(out.read_text())


@pytest.mark.slow  # every section end to end in its own processes: about a minute on 2 cores
def test_every_section_passes_or_skips_for_a_cpu_reason(tmp_path):
    done, record = smoke(tmp_path)
    sections = record["sections"]
    assert list(sections) == list(SECTIONS), done.stdout[-2000:]
    for key, row in sections.items():
        assert row["seconds"] >= 0
        if row["status"] == "SKIP":
            assert any(reason in row["reason"] for reason in CPU_SKIPS), f"{key}: {row['reason']}"
        else:
            assert row["status"] == "PASS", f"section {key}: {row['reason']}\n{row.get('traceback', '')[-1500:]}"
    for key in "ABCDE":  # nothing about these needs a GPU or vLLM
        assert sections[key]["status"] == "PASS", key
    assert sections["B"]["figures"]["specs"] == 5 * 2 * (5 + 2)  # rules x protect x (granularities, topk, bottom)
    assert sections["D"]["figures"].keys() == {"magnitude", "random", "lowrank", "wanda", "sequential_base",
                                               "head_dense", "checkpointing"}  # fmt: skip
    for key, row in sections.items():
        assert f"{key} {row['status']}" in " ".join(done.stdout.split()), key  # the table at the end
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_broken_section_is_reported_and_the_others_still_run(tmp_path):
    done, record = smoke(tmp_path, "--only", "AF", "--fail-section", "A")
    a, f = record["sections"]["A"], record["sections"]["F"]
    assert a["status"] == "FAIL" and "deliberately broken" in a["reason"] and "RuntimeError" in a["traceback"]
    assert f["status"] in ("PASS", "SKIP")  # it ran after A failed: on a CPU machine it says why it skips
    assert done.returncode == 1


def test_a_failing_check_inside_a_section_reports_its_message(tmp_path, monkeypatch):
    """A real check failing (not the injected one): section A's eigh check with an impossible tolerance."""
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check
    import gpu_check_sections

    monkeypatch.setattr(gpu_check, "check", lambda ok, what: gpu_check_sections.check(False, what))
    row = gpu_check.run_section("A", gpu_check_sections.Ctx("cpu", True, tmp_path), set())
    assert row["status"] == "FAIL" and row["reason"].startswith("AssertionError: eigh float32: residual")


def test_the_split_section_catches_checkpointing_that_drops_accelerates_hooks(tmp_path, monkeypatch):
    """Section C against dc1a1ed's checkpointing, which deleted block.forward (and accelerate's hook with it)."""
    import contextlib
    import functools

    from torch.utils.checkpoint import checkpoint

    from harmsweep.models.parts import decoder_blocks
    from harmsweep.scoring import snip

    @contextlib.contextmanager
    def dropping_hooks(model, enabled=True):
        _, blocks = decoder_blocks(model)
        for block in blocks:
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
        try:
            yield
        finally:
            for block in blocks:
                del block.forward

    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check
    import gpu_check_sections

    monkeypatch.setattr(snip, "checkpointed", dropping_hooks)
    row = gpu_check.run_section("C", gpu_check_sections.Ctx("cpu", True, tmp_path), set())
    assert row["status"] == "FAIL" and "checkpointing dropped accelerate's hook on blocks [0, 1]" in row["reason"]
