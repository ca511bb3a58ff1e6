"""What every benchmark shares: the parser's common options, the model from conf/model, the data root."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import yaml

from harmsweep.models import LoadedModel, load_model

ROOT = Path(__file__).resolve().parents[1]


def parser(doc: str, name: str, **defaults: Any) -> argparse.ArgumentParser:
    """--model, --n, --reps and --out (outputs/bench/<name>.json); the caller adds its own options."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--model", default="smollm2_135m")
    p.add_argument("--n", type=int, default=defaults.get("n", 16))
    p.add_argument("--reps", type=int, default=defaults.get("reps", 2))
    p.add_argument("--out", default=str(ROOT / "outputs" / "bench" / f"{name}.json"))
    return p


def model(name: str) -> LoadedModel:
    """The aligned checkpoint of conf/model/<name>.yaml, through the same loader as the app."""
    cfg = yaml.safe_load((ROOT / "conf" / "model" / f"{name}.yaml").read_text())
    return load_model(cfg, "aligned", os.environ.get("HARMSWEEP_CACHE", str(Path.home() / ".cache" / "harmsweep")))


def data_root() -> str:
    return os.environ.get("HARMSWEEP_DATA", str(ROOT.parent / "shared" / "data"))


def write(out: str, record: dict[str, Any]) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
