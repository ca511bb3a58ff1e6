"""The config: its schema (typos and wrong types fail while composing), its checks, its identity.

conf/config.yaml composes onto ``Config`` (registered as ``harmsweep_schema``), so an override such
as ``pruning.sparsty=1e-4`` or ``pruning.sparsity=lots`` fails while composing, before any work.
Value ranges and cross-field rules are checked by check_config (with PruneSpec.validate and the
evaluation plan) before any work; run_id names a run by what can change its results.
Free-form parts (a model's checkpoints, judge options) stay dicts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore

from harmsweep.calibration import RESPONSE_MODES
from harmsweep.errors import HarmsweepError
from harmsweep.evaluation.suite import plan
from harmsweep.pruning import PruneSpec


@dataclass
class ModelConfig:
    name: str = "?"
    path: str | None = None
    dtype: str = "float32"
    trust_remote_code: bool = False
    variants: dict[str, Any] = field(default_factory=dict)  # alignment name -> checkpoint spec


@dataclass
class AlignmentConfig:
    name: str = "aligned"
    template: str = "chat"


@dataclass
class DatasetRef:
    name: str = "advbench"
    file: str | None = None
    categories: list[str] | None = None


@dataclass
class DataConfig:
    root: str | None = None
    download: bool = False
    harmful: DatasetRef = field(default_factory=DatasetRef)
    benign: DatasetRef = field(default_factory=lambda: DatasetRef(name="alpaca"))


@dataclass
class HarmfulCalibration:
    responses: str = "prefill"
    file: str | None = None
    prefill_tokens: int = 8
    max_new_tokens: int = 48


@dataclass
class BenignCalibration:
    file: str | None = None


@dataclass
class CalibrationConfig:
    n: int = 32
    batch_size: int = 8
    gen_batch_size: int = 16
    max_length: int = 256
    harmful: HarmfulCalibration = field(default_factory=HarmfulCalibration)
    benign: BenignCalibration = field(default_factory=BenignCalibration)


@dataclass
class PruningConfig:
    rule: str = "signed_snip"
    sparsity: float = 1e-5
    protect: float = 0.01
    harm_fraction: float | None = None
    granularity: str = "global"
    benign_importance: str = "abs_signed"


@dataclass
class GenerationConfig:
    attack: str = "none"
    prefill_tokens: int = 8
    max_new_tokens: int = 64
    batch_size: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    backend: str = "hf"


@dataclass
class PerplexityConfig:
    max_length: int = 256


@dataclass
class LmEvalConfig:
    tasks: list[str] = field(default_factory=list)
    limit: int | None = 200
    batch_size: int = 8


@dataclass
class EvalConfig:
    metrics: list[str] = field(default_factory=list)
    n: int = 32
    batch_size: int = 8
    benign_references: str = "model"
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    perplexity: PerplexityConfig = field(default_factory=PerplexityConfig)
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)


@dataclass
class LoggerConfig:
    name: str = "none"
    project: str = "harmsweep"
    entity: str | None = None
    mode: str = "auto"
    dir: str | None = None
    group: str | None = None
    job_type: str | None = None
    tags: list[str] = field(default_factory=list)
    log_generations: bool = False
    log_mask: bool = False


@dataclass
class PathsConfig:
    cache_dir: str = "~/.cache/harmsweep"
    artifacts: str | None = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    judges: dict[str, Any] = field(default_factory=dict)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    experiment: str | None = None  # name of the experiment preset, if any (W&B job type)
    seed: int = 0
    device: str = "auto"


NOT_IN_RUN_ID = ("paths", "logger", "launcher", "hydra")


def run_id(cfg: Mapping[str, Any]) -> str:
    """Hash of the resolved config minus where things are stored and how they are launched/logged."""
    kept = {k: v for k, v in cfg.items() if k not in NOT_IN_RUN_ID}
    kept["data"] = {k: v for k, v in kept.get("data", {}).items() if k not in ("root", "download")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:12]


def prune_spec(cfg: Mapping[str, Any]) -> PruneSpec:
    p = cfg["pruning"]
    spec = PruneSpec(
        rule=p["rule"],
        sparsity=float(p["sparsity"]),
        protect=float(p["protect"]),
        harm_fraction=None if p.get("harm_fraction") is None else float(p["harm_fraction"]),
        granularity=p["granularity"],
        benign_importance=p["benign_importance"],
        seed=int(cfg["seed"]),
    )
    spec.validate()
    return spec


def check_config(cfg: Mapping[str, Any]) -> PruneSpec:
    """Every check that needs no model, so bad input fails in a second, before any work."""
    spec = prune_spec(cfg)
    plan(cfg["eval"], cfg["judges"])
    cal, data = cfg["calibration"], cfg["data"]
    mode = cal["harmful"]["responses"]
    if mode not in RESPONSE_MODES:
        raise HarmsweepError(f"calibration.harmful.responses={mode} is not one of {', '.join(RESPONSE_MODES)}")
    for key, value in (("calibration.n", cal["n"]), ("eval.n", cfg["eval"]["n"])):
        if int(value) < 1:
            raise HarmsweepError(f"{key}={value} must be at least 1")
    if mode == "file" and not cal["harmful"].get("file"):
        raise HarmsweepError(
            "calibration.harmful.responses=file needs calibration.harmful.file=PATH (JSONL: prompt, response)"
        )
    for key in ("calibration.harmful.file", "calibration.benign.file"):
        path = cal[key.split(".")[1]].get("file")
        if path and not Path(path).is_file():
            raise HarmsweepError(f"{key} not found: {path}")
    for side in ("harmful", "benign"):
        if data[side]["name"] == "custom" and not data[side].get("file"):
            raise HarmsweepError(
                f"data.{side}.name=custom needs data.{side}.file=PATH (CSV, JSON or JSONL with a prompt column)"
            )
    harmful_from_root = mode != "file" and not data["harmful"].get("file")
    benign_from_root = not cal["benign"].get("file") and not data["benign"].get("file")
    needs_root = harmful_from_root or benign_from_root
    root = data.get("root")
    if needs_root and (not root or not Path(str(root)).is_dir()):
        raise HarmsweepError(
            f"data root not found: {root} (set data.root=DIR or the HARMSWEEP_DATA environment variable)"
        )
    return spec


def register() -> None:
    ConfigStore.instance().store(name="harmsweep_schema", node=Config)
