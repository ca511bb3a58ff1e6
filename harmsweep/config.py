"""The config schema: structured configs that make Hydra reject a typo'd key or a wrong type.

conf/config.yaml composes onto ``Config`` (registered as ``harmsweep_schema``), so an override such
as ``pruning.sparsty=1e-4`` or ``pruning.sparsity=lots`` fails while composing, before any work.
Value ranges and cross-field rules stay in the stage modules (PruneSpec.validate, run.check_config),
next to the code they protect. Free-form parts (a model's checkpoints, judge options) stay dicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


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


def register() -> None:
    ConfigStore.instance().store(name="harmsweep_schema", node=Config)
