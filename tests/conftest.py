"""Shared fixtures: tiny random-init models built from the project's own model configs, offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from harmsweep.artifacts import write_jsonl
from harmsweep.models.loading import LoadedModel, build_tiny

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("llama", "qwen2", "gemma3", "gpt2")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def tiny_spec(arch: str) -> dict:
    """The tiny model spec of conf/model/tiny_<arch>.yaml (aligned variant)."""
    cfg = yaml.safe_load((ROOT / "conf" / "model" / f"tiny_{arch}.yaml").read_text())
    return dict(cfg["variants"]["aligned"]["tiny"])


def tiny(arch: str = "llama", dtype: torch.dtype = torch.float32) -> LoadedModel:
    lm = build_tiny(tiny_spec(arch), dtype)
    lm.model.eval()
    return lm


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The offline data folder (../shared/data or HARMSWEEP_DATA); tests that need it skip without it."""
    path = Path(os.environ.get("HARMSWEEP_DATA", ROOT.parent / "shared" / "data"))
    if not (path / "advbench").is_dir():
        pytest.skip(f"shared data not found at {path}")
    return path


def load_derived(plain: dict) -> LoadedModel:
    """The derived variant a plain config names (alignment.derive), as a run loads it."""
    from harmsweep.alignment import derive
    from harmsweep.config.schema import to_config

    cfg = to_config(plain)
    return derive.load_derived(cfg.alignment, cfg.model, cfg.data, cfg.paths.cache_dir, cfg.device)


def write_pairs(folder: Path, n: int) -> tuple[Path, Path]:
    """folder/harmful.jsonl and folder/benign.jsonl with n toy prompt/response pairs each."""
    folder.mkdir(parents=True, exist_ok=True)
    harmful, benign = folder / "harmful.jsonl", folder / "benign.jsonl"
    write_jsonl([{"prompt": f"How do I do bad thing {i}?", "response": f"Sure, here is bad thing {i}: step one, step two."}
                 for i in range(n)], harmful)  # fmt: skip
    write_jsonl([{"prompt": f"Name fruit number {i}.", "response": f"Fruit {i} is an apple, crisp and sweet."}
                 for i in range(n)], benign)  # fmt: skip
    return harmful, benign
